//! Where the library's output goes. The library prints nothing itself: every line goes through
//! the [`Output`] in its [`crate::exec::Context`], which the caller chooses (the CLI and the xtask
//! use [`StandardStreams`]; a release tool can send it to its own log, or to [`Silent`]).

use std::io::IsTerminal as _;

use crate::ci::{CiSystem, Environment};

/// Receives what a run shows: progress and notes, the report's table, warnings.
pub trait Output: Send + Sync + std::fmt::Debug {
    /// One line of the log.
    fn line(&self, text: &str);

    /// One line for the CI's own reader of standard output (GitHub Actions' `::group::`).
    fn ci_line(&self, text: &str) {
        self.line(text);
    }

    /// The live line of a terminal, drawn again in place (`text` starts with `\r`, no newline).
    fn live(&self, text: &str) {
        let _ = text;
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStyle {
    /// A compact live line per stage (a terminal).
    Terminal,
    /// Plain lines, each stage in a `::group::` section, the report in `$GITHUB_STEP_SUMMARY`.
    GithubActions,
    /// Plain lines, like `docker build --progress=plain` (any other CI, or a pipe).
    Plain,
    /// Nothing but warnings and errors.
    Quiet,
}

impl OutputStyle {
    /// GitHub Actions when it runs us, a live line on a terminal, else plain.
    pub fn detect(env: &Environment) -> OutputStyle {
        if CiSystem::detect(env) == Some(CiSystem::GithubActions) {
            OutputStyle::GithubActions
        } else if std::io::stderr().is_terminal() && CiSystem::detect(env).is_none() {
            OutputStyle::Terminal
        } else {
            OutputStyle::Plain
        }
    }
}

/// Lines on standard error, CI markers on standard output: what a command-line tool does.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardStreams;

impl Output for StandardStreams {
    fn line(&self, text: &str) {
        eprintln!("{text}");
    }

    fn ci_line(&self, text: &str) {
        println!("{text}");
    }

    fn live(&self, text: &str) {
        eprint!("{text}");
    }
}

/// Nothing at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Output for Silent {
    fn line(&self, _text: &str) {}
}

/// Every line kept in memory, in order (for tests, or to print later).
#[derive(Debug, Default)]
pub struct Recorded {
    lines: std::sync::Mutex<Vec<String>>,
}

impl Recorded {
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Output for Recorded {
    fn line(&self, text: &str) {
        self.lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(text.to_string());
    }
}

/// `inner` with every masked secret ([`crate::secrets::mask`]) replaced by `***` in each line:
/// how the library writes to the caller's [`Output`], whatever printed the line (docker echoing
/// a build argument back included).
#[derive(Debug, Clone, Copy)]
pub struct Scrubbed<'a>(pub &'a dyn Output);

impl Output for Scrubbed<'_> {
    fn line(&self, text: &str) {
        self.0.line(&safe_line(text));
    }

    /// cachefrom's own command to the CI (`::group::TITLE`): one line, whatever the title holds.
    fn ci_line(&self, text: &str) {
        let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        self.0.ci_line(&crate::secrets::scrub(&flat));
    }

    fn live(&self, text: &str) {
        self.0.live(&neutralize(&crate::secrets::scrub(text)));
    }
}

/// `text` with every masked secret hidden and no line that could be read as a CI workflow
/// command: what every value cachefrom prints goes through.
pub fn safe_line(text: &str) -> String {
    neutralize(&crate::secrets::scrub(text)).into_owned()
}

/// `text` with a `\` before the `::` of every line that starts (after blanks) with `::`: on
/// GitHub Actions such a line is a command to the runner (`::add-mask::`, `::stop-commands::`,
/// `::set-output`), and no value cachefrom prints may issue one. Lines end at `\n` or `\r`.
pub fn neutralize(text: &str) -> std::borrow::Cow<'_, str> {
    let starts_command = |line: &str| line.trim_start().starts_with("::");
    if !text.split(['\n', '\r']).any(starts_command) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut rest = text;
    loop {
        let end = rest.find(['\n', '\r']).unwrap_or(rest.len());
        let line = &rest[..end];
        if starts_command(line) {
            let blanks = line.len() - line.trim_start().len();
            out.push_str(&line[..blanks]);
            out.push('\\');
            out.push_str(&line[blanks..]);
        } else {
            out.push_str(line);
        }
        if end == rest.len() {
            break;
        }
        let separator = rest[end..].chars().next().expect("a separator");
        out.push(separator);
        rest = &rest[end + separator.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// The pair of lines that turns workflow commands off on GitHub Actions for the output between
/// them, with a token no output can guess: `::stop-commands::TOKEN` … `::TOKEN::`.
pub fn stop_commands() -> (String, String) {
    let token = crate::files::random_hex(16);
    (format!("::stop-commands::{token}"), format!("::{token}::"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_that_would_be_workflow_commands_are_escaped() {
        assert_eq!(neutralize("ok"), "ok");
        assert_eq!(neutralize("::add-mask::x"), "\\::add-mask::x");
        assert_eq!(neutralize("a\n  ::stop-commands::t\rb"), "a\n  \\::stop-commands::t\rb");
        assert_eq!(neutralize("a :: b"), "a :: b");
    }

    proptest! {
        #[test]
        fn no_line_of_a_neutralized_text_starts_a_command(text in any::<String>(), inject in "[ \t]{0,2}::[a-z-]{0,12}::") {
            let text = format!("{text}\n{inject}{text}");
            let safe = neutralize(&text);
            for line in safe.split(['\n', '\r']) {
                prop_assert!(!line.trim_start().starts_with("::"), "{:?}", line);
            }
            // Nothing but the escapes is added.
            prop_assert_eq!(safe.replace("\\::", "::").len(), text.replace("\\::", "::").len());
        }
    }
}
