//! The one place that runs `docker`: every call has a purpose (used in logs and errors), a
//! timeout, and its command line rendered with secrets hidden.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::render::render_command;

/// How long each kind of docker call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Quick questions: `docker version`, `docker info`, `docker buildx inspect`.
    pub probe: Duration,
    /// One `docker build` of one stage.
    pub build: Duration,
    /// One push, pull, save or load.
    pub transfer: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            probe: Duration::from_secs(20),
            build: Duration::from_secs(3600),
            transfer: Duration::from_secs(900),
        }
    }
}

/// A request to stop the build, shared by everything that runs it: a signal handler (the CLI's
/// SIGINT and SIGTERM), or a caller's own reason. A build running when it is requested is
/// stopped with its children; what the build finished still has its cache written.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<std::sync::atomic::AtomicUsize>);

impl Cancel {
    /// Asks for the build to stop, for `signal` (its number, e.g. 15; any non-zero value).
    pub fn request(&self, signal: usize) {
        self.0.store(signal.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// The signal the stop was requested for, if it was.
    pub fn requested(&self) -> Option<usize> {
        match self.0.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }

    /// The counter a signal handler sets (e.g. with `signal_hook::flag::register_usize`).
    pub fn flag(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        Arc::clone(&self.0)
    }
}

/// A docker client: the program and the environment it runs with.
#[derive(Debug, Clone)]
pub struct Docker {
    /// The `docker` program (`CACHEFROM_DOCKER`, else `docker` on `PATH`).
    pub program: PathBuf,
    /// Extra environment variables for every call (e.g. `DOCKER_HOST`).
    pub env: Vec<(String, String)>,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Stops a streamed build when requested ([`Docker::stream`]).
    pub cancel: Cancel,
}

/// What a finished docker call printed.
#[derive(Debug, Clone)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// True when the exit status was 0.
    pub success: bool,
    /// The exit code, if the process exited.
    pub code: Option<i32>,
}

impl Default for Docker {
    fn default() -> Self {
        let program =
            std::env::var_os("CACHEFROM_DOCKER").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("docker"));
        Docker { program, env: Vec::new(), timeouts: Timeouts::default(), cancel: Cancel::default() }
    }
}

impl Docker {
    fn expression(&self, args: &[String]) -> duct::Expression {
        let mut expression = duct::cmd(self.program.as_os_str(), args).unchecked();
        for (name, value) in &self.env {
            expression = expression.env(name, value);
        }
        expression
    }

    fn spawn_error(&self, error: std::io::Error, purpose: &str) -> anyhow::Error {
        if error.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "{purpose}: `{}` was not found; install the Docker CLI, or point CACHEFROM_DOCKER at it",
                self.program.display()
            )
        } else {
            anyhow::anyhow!("{purpose}: cannot start `{}`: {error}", self.program.display())
        }
    }

    /// Runs `docker ARGS`, capturing its output; fails only if it cannot start or times out.
    pub fn run(&self, purpose: &str, args: &[String], timeout: Duration) -> Result<Output> {
        run_with_timeout(self.expression(args), purpose, &render_command(args), timeout).map_err(|error| {
            match error.downcast::<std::io::Error>() {
                Ok(io) => self.spawn_error(io, purpose),
                Err(other) => other,
            }
        })
    }

    /// Like [`Docker::run`], but a non-zero exit is an error quoting the command and its stderr.
    pub fn run_checked(&self, purpose: &str, args: &[String], timeout: Duration) -> Result<Output> {
        let output = self.run(purpose, args, timeout)?;
        if !output.success {
            let stderr = last_lines(&output.stderr, 6);
            bail!("{purpose}: `{}` failed: {}", render_command(args), crate::secrets::scrub(&stderr));
        }
        Ok(output)
    }

    /// Runs `docker ARGS` with stderr and stdout merged, handing each line to `on_line` as it
    /// comes. Returns the exit code (`None` if killed by a signal).
    pub fn stream(
        &self,
        purpose: &str,
        args: &[String],
        timeout: Duration,
        mut on_line: impl FnMut(&str),
    ) -> Result<Option<i32>> {
        let reader = self
            .expression(args)
            .stdin_null()
            .stderr_to_stdout()
            .reader()
            .map_err(|error| self.spawn_error(error, purpose))?;
        let reader = Arc::new(reader);
        let (done, finished) = mpsc::channel::<()>();
        let watchdog = {
            let reader = Arc::clone(&reader);
            let cancel = self.cancel.clone();
            let deadline = Instant::now() + timeout;
            std::thread::spawn(move || loop {
                match finished.recv_timeout(Duration::from_millis(50)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let cancelled = cancel.requested().is_some();
                        if cancelled || Instant::now() >= deadline {
                            for pid in reader.pids() {
                                kill_tree(pid);
                            }
                            let _ = reader.kill();
                            return Some(cancelled);
                        }
                    }
                    _ => return None,
                }
            })
        };
        let mut lines = BufReader::new(&*reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => on_line(String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r'])),
                Err(_) => break,
            }
        }
        let _ = done.send(());
        match watchdog.join().unwrap_or(None) {
            Some(true) => bail!("{purpose}: stopped, as asked (cancelled)"),
            Some(false) => {
                bail!(
                    "{purpose}: `{}` did not finish within {}s and was stopped",
                    render_command(args),
                    timeout.as_secs()
                )
            }
            None => {}
        }
        let output = reader.try_wait().with_context(|| format!("{purpose}: waiting for docker"))?;
        Ok(output.and_then(|output| output.status.code()))
    }
}

/// Runs any program with a timeout (used for `tar`), capturing its output.
pub fn run_program(program: &str, args: &[String], purpose: &str, timeout: Duration) -> Result<Output> {
    let shown = std::iter::once(program.to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ");
    let output = run_with_timeout(duct::cmd(program, args).unchecked(), purpose, &shown, timeout).map_err(|error| {
        match error.downcast::<std::io::Error>() {
            Ok(io) => anyhow::anyhow!("{purpose}: cannot start `{program}`: {io}"),
            Err(other) => other,
        }
    })?;
    if !output.success {
        bail!("{purpose}: `{shown}` failed: {}", last_lines(&output.stderr, 6));
    }
    Ok(output)
}

/// Starts `expression`, waits up to `timeout`, and kills it (with its children) past that.
/// A start failure comes back as an `std::io::Error` inside the `anyhow::Error`.
pub(crate) fn run_with_timeout(
    expression: duct::Expression,
    purpose: &str,
    shown: &str,
    timeout: Duration,
) -> Result<Output> {
    let handle = expression.stdin_null().stdout_capture().stderr_capture().start().map_err(anyhow::Error::new)?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(output) = handle.try_wait().with_context(|| format!("{purpose}: waiting for `{shown}`"))? {
            return Ok(Output {
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                success: output.status.success(),
                code: output.status.code(),
            });
        }
        if Instant::now() >= deadline {
            for pid in handle.pids() {
                kill_tree(pid);
            }
            let _ = handle.kill();
            bail!("{purpose}: `{shown}` did not finish within {}s and was stopped", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills `pid` and every process below it. `docker` runs plugins such as `docker-buildx` as
/// children, which would otherwise outlive a timeout and keep the output pipes open.
fn kill_tree(pid: u32) {
    for child in child_pids(pid) {
        kill_tree(child);
    }
    // SAFETY: kill(2) with a pid we started (or its descendant) and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The children of `pid`, from /proc (Linux); empty elsewhere.
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| children.split_whitespace().filter_map(|pid| pid.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// The last `count` non-empty lines of `text`, joined with ` | `.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    let start = lines.len().saturating_sub(count);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        "(no output)".to_string()
    } else {
        joined
    }
}

/// `SIGINT` for 2, `SIGTERM` for 15, `signal N` otherwise.
pub fn signal_name(signal: usize) -> String {
    match signal {
        2 => "SIGINT".to_string(),
        15 => "SIGTERM".to_string(),
        1 => "a cancel request".to_string(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(script: &str) -> (tempfile::TempDir, Docker) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, Docker { program: path, env: vec![], timeouts: Timeouts::default(), cancel: Cancel::default() })
    }

    #[test]
    fn a_hanging_command_is_stopped_at_its_timeout() {
        let (_dir, docker) = fake("sleep 30");
        let started = Instant::now();
        let error = docker.run("probing", &["version".into()], Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(error.to_string().contains("did not finish within 0s"), "{error}");
        let error = docker.stream("building", &["build".into()], Duration::from_millis(300), |_| {}).unwrap_err();
        assert!(error.to_string().starts_with("building: `docker build` did not finish"), "{error}");
    }

    #[test]
    fn a_missing_program_says_what_to_do() {
        let docker = Docker {
            program: "/nonexistent/docker".into(),
            env: vec![],
            timeouts: Timeouts::default(),
            cancel: Cancel::default(),
        };
        let error = docker.run("probing", &[], Duration::from_secs(1)).unwrap_err().to_string();
        assert!(error.contains("was not found; install the Docker CLI"), "{error}");
    }

    #[test]
    fn failures_quote_the_command_with_secrets_hidden() {
        let (_dir, docker) = fake("echo 'boom' >&2; exit 3");
        let args: Vec<String> = ["build", "--build-arg", "GH_TOKEN=abc123", "."].map(String::from).to_vec();
        let error = docker.run_checked("building x", &args, Duration::from_secs(5)).unwrap_err().to_string();
        assert_eq!(error, "building x: `docker build --build-arg 'GH_TOKEN=***' .` failed: boom");
    }

    #[test]
    fn streaming_hands_over_every_line_and_the_exit_code() {
        let (_dir, docker) = fake("echo one; echo two >&2; exit 7");
        let mut lines = Vec::new();
        let code = docker.stream("x", &[], Duration::from_secs(5), |line| lines.push(line.to_string())).unwrap();
        assert_eq!(code, Some(7));
        lines.sort();
        assert_eq!(lines, ["one", "two"]);
    }
}
