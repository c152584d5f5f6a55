//! How a command is shown to a person: each word quoted for bash where it needs it (control
//! characters as `$'…'`, so a word never spans lines), and every value that can hold a secret
//! hidden. The one place the plan, the script and the docker runner render commands from.

use crate::secrets::{self, HIDDEN};

/// `docker_args` as they may be shown: the values of secret build arguments, secret options in
/// the `KEY=VALUE,…` values of `--cache-from`, `--cache-to`, `--secret` and `--output`, and any
/// URL with credentials (`scheme://user:pass@…`) or well-known token hidden. Other words (paths,
/// tags, the context) are shown as they are, so that the printed command stays the one that runs.
pub fn redact_docker_args(docker_args: &[String]) -> Vec<String> {
    const OPTION_LISTS: [&str; 5] = ["--cache-from", "--cache-to", "--secret", "--output", "-o"];
    let mut out = Vec::with_capacity(docker_args.len());
    let mut previous: Option<&str> = None;
    for arg in docker_args {
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (Some(flag), value),
            _ => (previous, arg.as_str()),
        };
        let prefix =
            if flag.is_some() && flag != previous { format!("{}=", flag.unwrap_or_default()) } else { String::new() };
        let shown = match flag {
            Some("--build-arg") => match value.split_once('=') {
                Some((name, value)) if secrets::is_secret(name, value) => format!("{prefix}{name}={HIDDEN}"),
                _ => arg.clone(),
            },
            Some(flag) if OPTION_LISTS.contains(&flag) => format!("{prefix}{}", secrets::redact_options(value)),
            _ if value.contains("://") && secrets::is_secret_value(value) => format!("{prefix}{HIDDEN}"),
            _ if secrets::is_secret_shape(value) => format!("{prefix}{HIDDEN}"),
            // `--label token=…`, `--env PASSWORD=…`: a secret-named key's value.
            _ => match value.split_once('=') {
                Some((name, inner))
                    if !name.is_empty() && (secrets::is_secret_name(name) || secrets::is_secret_shape(inner)) =>
                {
                    format!("{prefix}{name}={HIDDEN}")
                }
                _ => arg.clone(),
            },
        };
        previous = if arg.starts_with('-') && !arg.contains('=') { Some(arg.as_str()) } else { None };
        out.push(secrets::scrub(&shown).into_owned());
    }
    out
}

/// Quotes `word` for bash when it needs it: `'…'`, or bash's `$'…'` when it holds a control
/// character (a newline, a carriage return), so that every quoted word stays on its line.
pub fn shell_quote(word: &str) -> String {
    // A word that starts with `:` is quoted too: alone on a line it could read as a CI command.
    let plain = !word.is_empty()
        && !word.starts_with(':')
        && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        word.to_string()
    } else if word.chars().any(char::is_control) {
        let mut out = String::from("$'");
        for c in word.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
                c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('\'');
        out
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A docker command line, secrets hidden, as one shell line.
pub fn render_command(args: &[String]) -> String {
    let redacted = redact_docker_args(args);
    std::iter::once("docker".to_string())
        .chain(redacted.iter().map(|arg| shell_quote(arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A docker command line, secrets hidden, one option (with its value) a line.
pub fn render_command_multiline(args: &[String]) -> String {
    let redacted = redact_docker_args(args);
    let mut lines = vec![format!(
        "docker {}",
        redacted.iter().take_while(|arg| !arg.starts_with('-')).cloned().collect::<Vec<_>>().join(" ")
    )];
    let mut rest = redacted.iter().skip_while(|arg| !arg.starts_with('-')).peekable();
    while let Some(arg) = rest.next() {
        let takes_value = matches!(
            arg.as_str(),
            "--target"
                | "-f"
                | "--build-arg"
                | "--cache-from"
                | "--cache-to"
                | "-t"
                | "--secret"
                | "--network"
                | "--platform"
                | "--output"
        );
        match rest.peek() {
            Some(value) if takes_value => {
                lines.push(format!("{} {}", shell_quote(arg), shell_quote(value)));
                rest.next();
            }
            _ => lines.push(shell_quote(arg)),
        }
    }
    lines.join(" \\\n  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_after_the_double_dash_is_hidden_whatever_the_option() {
        let words: Vec<String> = [
            "--label",
            "token=ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "--label=CONFIG={\"password\":\"hunter2\"}",
            "--label",
            "app=web",
        ]
        .map(String::from)
        .to_vec();
        let shown = redact_docker_args(&words).join(" ");
        assert!(!shown.contains("ghp_") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("token=***") && shown.contains("app=web"), "{shown}");
    }

    #[test]
    fn control_characters_never_leave_their_line() {
        assert_eq!(shell_quote("a\nb"), "$'a\\nb'");
        assert_eq!(shell_quote("it's\t"), "$'it\\'s\\t'");
        assert_eq!(shell_quote("::x"), "'::x'");
        assert_eq!(shell_quote("plain-word"), "plain-word");
    }
}
