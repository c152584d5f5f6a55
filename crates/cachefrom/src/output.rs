//! Where the library's output goes. The library prints nothing itself: every line goes through
//! the [`Output`] in its [`crate::exec::Context`], which the caller chooses (the CLI and the xtask
//! use [`StandardStreams`]; a release tool can send it to its own log, or to [`Silent`]).

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
        self.0.line(&crate::secrets::scrub(text));
    }

    fn ci_line(&self, text: &str) {
        self.0.ci_line(&crate::secrets::scrub(text));
    }

    fn live(&self, text: &str) {
        self.0.live(&crate::secrets::scrub(text));
    }
}
