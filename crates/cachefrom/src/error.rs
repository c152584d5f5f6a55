//! The errors a run ends with, as a caller matches them, and the exit code each one means.

use crate::report::RunReport;

/// Why [`crate::build_with_cache`] stopped. Every variant keeps the full error chain (`{:#}`
/// shows it); [`Error::exit_code`] is the code the `cachefrom` CLI exits with.
#[derive(Debug)]
pub enum Error {
    /// The options, the Dockerfile or the target are wrong: fix the input (exit 2).
    Usage(anyhow::Error),
    /// The engine cannot build: docker missing, the daemon not answering, a backend it cannot
    /// serve (exit 3).
    Engine(anyhow::Error),
    /// Cache errors are fatal (`--strict-cache`) and a cache could not be read or written (exit 3).
    /// When the build itself ran, its report is in [`Error::report`].
    Cache(anyhow::Error),
    /// The build failed; the caches of the stages it finished were written (exit 1).
    BuildFailed(Box<BuildFailed>),
    /// A signal (or [`crate::docker::Cancel::request`]) stopped the run; the caches of the stages it
    /// finished were written (exit 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM).
    Cancelled {
        /// The signal's number.
        signal: usize,
        /// The run's report, marked cancelled.
        failed: Box<BuildFailed>,
    },
}

/// Exit code of a build that failed.
pub const EXIT_BUILD_FAILED: u8 = 1;
/// Exit code of a usage error: a bad option, a missing Dockerfile, an unknown target.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the environment is not ready: docker missing, the daemon not answering, or
/// (with --strict-cache) a cache that cannot be read or written.
pub const EXIT_ENVIRONMENT: u8 = 3;

impl Error {
    /// The exit code: 1 build failed, 2 usage, 3 environment (engine, strict cache), 128 + signal.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::Engine(_) | Error::Cache(_) => EXIT_ENVIRONMENT,
            Error::BuildFailed(_) => EXIT_BUILD_FAILED,
            Error::Cancelled { signal, .. } => u8::try_from(128 + signal).unwrap_or(143),
        }
    }

    /// The run's report, when the build ran.
    pub fn report(&self) -> Option<&RunReport> {
        match self {
            Error::BuildFailed(failed) | Error::Cancelled { failed, .. } => Some(&failed.report),
            Error::Cache(error) => error.downcast_ref::<BuildFailed>().map(|failed| &failed.report),
            Error::Usage(_) | Error::Engine(_) => None,
        }
    }

    /// Sorts the error of a run that got as far as building: cancelled, a failed build, or (the
    /// build succeeded) a failed cache write.
    pub(crate) fn of_run(error: anyhow::Error, cancel: &crate::docker::Cancel) -> Error {
        let failed = match error.downcast::<BuildFailed>() {
            Ok(failed) if failed.cache_write_only => return Error::Cache(anyhow::Error::new(failed)),
            Ok(failed) => failed,
            // Anything before the build (a strict cache check) is the cache's.
            Err(error) => return Error::Cache(error),
        };
        match cancel.requested() {
            Some(signal) => Error::Cancelled { signal, failed: Box::new(failed) },
            None => Error::BuildFailed(Box::new(failed)),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Usage(error) | Error::Engine(error) | Error::Cache(error) => write!(f, "{error:#}"),
            Error::BuildFailed(failed) | Error::Cancelled { failed, .. } => f.write_str(&failed.message),
        }
    }
}

impl std::error::Error for Error {}

/// A run whose build failed; carries the report. Find it with `error.downcast_ref::<BuildFailed>()`.
#[derive(Debug)]
pub struct BuildFailed {
    /// The run's report, with the failed stage.
    pub report: RunReport,
    /// The build's error, with push failures beside it.
    pub message: String,
    /// True when every stage built and only writing a cache failed (fatal with `--strict-cache`).
    pub cache_write_only: bool,
}

impl std::fmt::Display for BuildFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BuildFailed {}
