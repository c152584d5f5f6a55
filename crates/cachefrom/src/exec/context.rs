//! What every call needs: how to run docker, how to ask the registry, where output goes.

use crate::ci::Environment;
use crate::docker::Docker;
use crate::output::OutputStyle;
use crate::output::{Output, StandardStreams};
use crate::registry::RegistryClient;

/// What every call needs: how to run docker, how to ask the registry, where output goes.
#[derive(Debug, Clone)]
pub struct Context {
    /// The docker client.
    pub docker: Docker,
    /// The registry client for existence checks.
    pub registry: RegistryClient,
    /// How progress is shown.
    pub style: OutputStyle,
    /// Where everything shown goes (the library prints nothing itself).
    pub output: std::sync::Arc<dyn Output>,
    /// The environment (CI detection, step summary).
    pub env: Environment,
}

impl Context {
    /// The same context whose docker calls a cancel does not stop: what a cancel waits for
    /// (writing what finished, saving the cache mounts).
    pub(crate) fn uncancelled(&self) -> Context {
        Context { docker: crate::docker::Docker { cancel: Default::default(), ..self.docker.clone() }, ..self.clone() }
    }

    /// A context from the process environment: `docker` on PATH, the user's docker logins.
    pub fn from_environment() -> Context {
        let env = Environment::from_process();
        Context {
            docker: Docker::default(),
            registry: RegistryClient::default(),
            style: OutputStyle::detect(&env),
            output: std::sync::Arc::new(StandardStreams),
            env,
        }
    }

    /// Where the library writes: the caller's [`Output`], with masked secrets hidden.
    pub fn out(&self) -> crate::output::Scrubbed<'_> {
        crate::output::Scrubbed(&*self.output)
    }

    pub(crate) fn say(&self, line: &str) {
        if self.style != OutputStyle::Quiet {
            self.out().line(line);
        }
    }

    pub(crate) fn warn(&self, line: &str) {
        self.out().line(&format!("cachefrom: warning: {line}"));
    }
}
