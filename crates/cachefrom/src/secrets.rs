//! Values that are never shown: which ones count as secret, how they are hidden where cachefrom
//! renders them, and a process-wide mask over everything it prints or writes.
//!
//! - A build argument is secret when its name has a secret-looking word (TOKEN, SECRET, PASSWORD,
//!   PASS, PAT, KEY, CREDENTIAL, AUTH, DSN, …) or its value carries credentials (`user:pass@` in a
//!   URL or before a host) or has the shape of a well-known token (`ghp_…`, `glpat-…`, `AKIA…`, a
//!   PEM private key). Its value goes to docker in the environment (`--build-arg NAME`), never on
//!   the command line, and the plan says so.
//! - A backend option is secret by the same name rule (`secret_access_key`, `session_token`,
//!   `token`); S3 credentials and the GitHub token travel in the environment variables buildx reads
//!   (`AWS_ACCESS_KEY_ID`, …, `ACTIONS_RUNTIME_TOKEN`).
//! - Every secret value of 6 characters or more is also [`mask`]ed: [`scrub`] replaces it with
//!   `***` in every line, error, report and summary, whatever printed it (docker echoing it back).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::RwLock;

/// What a hidden value is shown as.
pub const HIDDEN: &str = "***";

/// The shortest value the process-wide mask hides: shorter ones (`1`, `true`) would garble
/// ordinary text, and are hidden only where cachefrom renders the value itself.
pub const MIN_MASKED_LEN: usize = 6;

/// Words that make a name secret when they are one of its words (`GH_PAT`, `SSH_KEY`, `SENTRY_DSN`).
const SECRET_WORDS: [&str; 21] = [
    "TOKEN",
    "TOKENS",
    "SECRET",
    "SECRETS",
    "PASSWORD",
    "PASSWD",
    "PASS",
    "PWD",
    "PAT",
    "KEY",
    "KEYS",
    "CREDENTIAL",
    "CREDENTIALS",
    "CREDS",
    "AUTH",
    "DSN",
    "COOKIE",
    "SESSION",
    "PRIVATE",
    "SIGNATURE",
    "CERT",
];

/// Parts that make a name secret wherever they appear (`githubToken`, `DB_PASSWORD1`, `APIKEY`).
const SECRET_PARTS: [&str; 8] = ["TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "APIKEY", "PRIVATEKEY", "AUTH"];

/// True for a name (build argument, backend option, variable) that usually holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_uppercase();
    let squashed: String = upper.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    SECRET_PARTS.iter().any(|part| squashed.contains(part))
        || upper.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| SECRET_WORDS.contains(&word))
}

/// Whether a value has one shape of secret.
pub type SecretTest = fn(&str) -> bool;

/// The shapes of secret values, in one place: a name, and the test of a value. A value of any of
/// these shapes is hidden wherever cachefrom shows it, and a build argument holding one reaches
/// docker through its environment.
pub const SECRET_SHAPES: &[(&str, SecretTest)] = &[
    ("a token with a well-known prefix (ghp_, glpat-, xoxb-, sk_live_, AIza, AKIA, …)", has_token_prefix),
    ("a JSON Web Token (eyJ….eyJ….…)", is_jwt),
    ("a PEM private key", |value| value.contains("PRIVATE KEY-----")),
    ("a base64-encoded PEM key (LS0tLS1CRUdJTi…)", |value| value.contains("LS0tLS1CRUdJTi")),
    ("JSON with a secret-named field ({\"password\":…})", has_secret_json_field),
];

/// Prefixes of well-known tokens, each with the shortest such token.
const TOKEN_PREFIXES: [(&str, usize); 24] = [
    ("ghp_", 16),
    ("gho_", 16),
    ("ghu_", 16),
    ("ghs_", 16),
    ("ghr_", 16),
    ("github_pat_", 16),
    ("glpat-", 16),
    ("xoxb-", 16),
    ("xoxp-", 16),
    ("xoxa-", 16),
    ("xoxr-", 16),
    ("xoxs-", 16),
    ("xapp-", 16),
    ("npm_", 16),
    ("AKIA", 16),
    ("ASIA", 16),
    ("sk_live_", 16),
    ("sk_test_", 16),
    ("rk_live_", 16),
    ("rk_test_", 16),
    ("whsec_", 16),
    ("AIza", 30),
    ("sk-", 20),
    ("dop_v1_", 16),
];

fn has_token_prefix(value: &str) -> bool {
    let value = value.trim();
    TOKEN_PREFIXES.iter().any(|(prefix, shortest)| {
        value.starts_with(prefix)
            && value.len() >= *shortest
            && value[prefix.len()..].chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    })
}

/// Three base64url parts, the first two of them JSON objects (`eyJ` is `{"` encoded).
fn is_jwt(value: &str) -> bool {
    let parts: Vec<&str> = value.trim().split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts[1].starts_with("eyJ")
        && parts.iter().all(|part| part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=')))
}

/// A JSON object (at any depth) with a field named like a secret holding a value.
fn has_secret_json_field(value: &str) -> bool {
    fn walk(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::Object(map) => map.iter().any(|(key, value)| {
                (is_secret_name(key) && !matches!(value, serde_json::Value::Null | serde_json::Value::Bool(_)))
                    || walk(value)
            }),
            serde_json::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    let trimmed = value.trim();
    if !trimmed.starts_with(['{', '[']) || trimmed.len() > 1024 * 1024 {
        return false;
    }
    match serde_json::from_str::<serde_json::Value>(trimmed) {
        Ok(parsed) => walk(&parsed),
        // Not JSON after all: a quoted secret-named key followed by a colon still counts.
        Err(_) => trimmed
            .split('"')
            .collect::<Vec<_>>()
            .windows(2)
            .any(|pair| is_secret_name(pair[0]) && pair[1].trim_start().starts_with(':')),
    }
}

/// True for a value that carries credentials: `scheme://user[:pass]@…`, `user:pass@host…`, or
/// one of the [`SECRET_SHAPES`].
pub fn is_secret_value(value: &str) -> bool {
    has_userinfo(value) || is_secret_shape(value)
}

/// True for a value of one of the [`SECRET_SHAPES`] (credentials in a URL aside).
pub fn is_secret_shape(value: &str) -> bool {
    SECRET_SHAPES.iter().any(|(_, test)| test(value))
}

/// True when `value` has a URL's user information, or is `user:pass@host…`.
pub fn has_userinfo(value: &str) -> bool {
    if let Some((_, rest)) = value.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        return authority.contains('@');
    }
    // No scheme: `user:pass@host[:port][/…]`, the user and the password without spaces.
    let first = value.split('/').next().unwrap_or(value);
    match first.split_once('@') {
        Some((userinfo, host)) => userinfo.contains(':') && !host.is_empty() && !first.contains(char::is_whitespace),
        None => false,
    }
}

/// True when a `NAME=VALUE` pair should not be shown.
pub fn is_secret(name: &str, value: &str) -> bool {
    is_secret_name(name) || is_secret_value(value)
}

/// `KEY=VALUE,KEY=VALUE` (a `--cache-to` value, a backend) with the values of secret options
/// and values with credentials hidden.
pub fn redact_options(text: &str) -> String {
    text.split(',')
        .map(|part| match part.split_once('=') {
            Some((key, value)) if is_secret(key, value) => format!("{key}={HIDDEN}"),
            _ if is_secret_value(part) => HIDDEN.to_string(),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

static MASKED: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// Hides `value` in everything [`scrub`]bed from now on, in this process (values shorter than
/// [`MIN_MASKED_LEN`] are left to the places that render them).
pub fn mask(value: &str) {
    let value = value.trim();
    if value.chars().count() >= MIN_MASKED_LEN {
        MASKED.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(value.to_string());
    }
}

/// `text` with every [`mask`]ed value replaced by `***`, longest first.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let masked = MASKED.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !masked.iter().any(|value| text.contains(value.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut values: Vec<&String> = masked.iter().collect();
    values.sort_by_key(|value| std::cmp::Reverse(value.len()));
    let mut out = text.to_string();
    for value in values {
        if out.contains(value.as_str()) {
            out = out.replace(value.as_str(), HIDDEN);
        }
    }
    Cow::Owned(out)
}

/// `value` quoted for an error line, with control characters and non-ASCII escaped (so it can
/// never break the line, nor start a CI command), masked values hidden, cut to 80 characters.
pub fn quoted(value: &str) -> String {
    let value = scrub(value);
    let quoted = format!("{:?}", value.chars().take(80).collect::<String>());
    let mut out: String =
        quoted.chars().map(|c| if c.is_ascii() { c.to_string() } else { c.escape_unicode().to_string() }).collect();
    if value.chars().count() > 80 {
        out.push_str("...");
    }
    out
}

/// The identifier-like start of `text` (letters, digits, `_`, `-`, `.`), at most 64 characters:
/// what an error may quote of a value it refuses.
pub fn name_part(text: &str) -> String {
    text.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One value of every shape in [`SECRET_SHAPES`], each hidden, and ordinary values that are not.
    #[test]
    fn every_secret_shape_is_recognised() {
        let examples = [
            ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
            ("stripe", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            ("google", "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe"),
            ("slack app", "xapp-1-A0123456789-0123456789012-abcdef"),
            ("base64 pem", "LS0tLS1CRUdJTiBPUEVOU1NIIFBSSVZBVEUgS0VZLS0tLS0K"),
            ("json", r#"{"password":"hunter2-long"}"#),
            ("nested json", r#"{"db":{"apiKey":"abc123def"}}"#),
            ("github", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
            ("pem", "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"),
        ];
        for (name, value) in examples {
            assert!(is_secret_value(value), "{name}: {value}");
            assert!(SECRET_SHAPES.iter().any(|(_, test)| test(value)), "{name}");
        }
        for (shape, _) in SECRET_SHAPES {
            assert!(
                examples
                    .iter()
                    .any(|(_, value)| SECRET_SHAPES.iter().find(|(s, _)| s == shape).is_some_and(|(_, t)| t(value))),
                "no example for {shape}"
            );
        }
        for ordinary in ["release", "1.2.3", "eyJ", r#"{"name":"app"}"#, "sk-1", "AIzaShort", "/path/to/file"] {
            assert!(!is_secret_value(ordinary), "{ordinary}");
        }
    }

    #[test]
    fn secret_names() {
        for name in [
            "GITHUB_TOKEN",
            "GH_PAT",
            "SSH_KEY",
            "SENTRY_DSN",
            "AWS_ACCESS_KEY_ID",
            "aws_secret_access_key",
            "session_token",
            "token",
            "NPM_AUTH",
            "DB_PASSWORD",
            "githubToken",
            "APIKEY",
            "MY_CREDENTIALS",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["VERSION", "BASE", "PATH", "RUST_VERSION", "TARGETPLATFORM", "bucket", "region", "DATABASE_URL"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn values_with_credentials() {
        for value in [
            "postgres://u:PASSWORD@db:5432/x",
            "https://x-access-token:abc@github.com/o/r",
            "https://ghs_token@github.com",
            "user:pass@registry.example.com/app",
            "ghp_0123456789abcdefghij",
            "AKIAIOSFODNN7EXAMPLE",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl",
        ] {
            assert!(is_secret_value(value), "{value}");
        }
        for value in ["1.2.3", "https://example.com/a@b", "127.0.0.1:5000/app@sha256:abc", "me@example.com", "true"] {
            assert!(!is_secret_value(value), "{value}");
        }
    }

    #[test]
    fn options_are_redacted_by_name_and_value() {
        assert_eq!(
            redact_options("type=s3,bucket=b,secret_access_key=SHH,session_token=T,endpoint_url=http://u:p@h"),
            "type=s3,bucket=b,secret_access_key=***,session_token=***,endpoint_url=***"
        );
    }

    #[test]
    fn masked_values_are_scrubbed_everywhere() {
        mask("masked-value-for-scrub-test");
        mask("abc");
        assert_eq!(scrub("x masked-value-for-scrub-test y abc"), "x *** y abc");
        assert!(matches!(scrub("nothing here"), Cow::Borrowed(_)));
    }

    proptest! {
        #[test]
        fn a_masked_value_never_survives_a_scrub(secret in "[a-zA-Z0-9_.:/@+=-]{6,40}", before in ".*", after in ".*") {
            mask(&secret);
            let text = format!("{before}{secret}{after}");
            prop_assert!(!scrub(&text).contains(&secret));
        }
    }
}
