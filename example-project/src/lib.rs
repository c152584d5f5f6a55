//! A small HTTP service: `GET /health` answers with the service's name and version as JSON.

use serde::Serialize;

/// What `GET /health` answers.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Health {
    /// Always `"ok"` while the process serves requests.
    pub status: &'static str,
    /// The crate's name.
    pub service: &'static str,
    /// The crate's version.
    pub version: &'static str,
}

/// The health record of this build.
pub fn health() -> Health {
    Health { status: "ok", service: env!("CARGO_PKG_NAME"), version: env!("CARGO_PKG_VERSION") }
}

/// The line `--version` prints.
pub fn version_line() -> String {
    format!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
}

/// Routes one request: the status code and the JSON body.
pub fn route(method: &str, path: &str) -> (u16, String) {
    match (method, path) {
        ("GET", "/health") => (200, serde_json::to_string(&health()).expect("plain struct serialises")),
        ("GET", _) => (404, r#"{"error":"not found"}"#.to_string()),
        _ => (405, r#"{"error":"method not allowed"}"#.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_answers_ok_with_name_and_version() {
        let (status, body) = route("GET", "/health");
        assert_eq!(status, 200);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["status"], "ok");
        assert_eq!(value["service"], "example-app");
        assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        assert_eq!(route("GET", "/nope").0, 404);
        assert_eq!(route("POST", "/health").0, 405);
    }

    #[test]
    fn version_line_names_the_crate() {
        assert_eq!(version_line(), format!("example-app {}", env!("CARGO_PKG_VERSION")));
    }
}
