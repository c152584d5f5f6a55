//! A registry that refuses access: one clear line naming `docker login`, and the build goes on
//! without that cache (exit 0); with --strict-cache the run stops with the environment's exit code.

use std::process::Command;

use cachefrom_tests::*;

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_registry_that_refuses_login_gives_one_line_and_the_build_goes_on() {
    let _serial = serial();
    need_stack("a_registry_that_refuses_login_gives_one_line_and_the_build_goes_on");
    let hash = bcrypt::hash("not-in-any-docker-config", 4).unwrap();
    let registry = TempRegistry::start_with_auth(5002, Some(&format!("ci:{hash}\n"))).unwrap();
    let repo = example_repository_copy().unwrap();
    let config_dir = tempfile::tempdir().unwrap(); // an empty docker config: no login saved
    let image = format!("{}/locked/app", registry.address);
    let run = |extra: &[&str]| {
        let mut args: Vec<String> =
            ["build", "--image", image.as_str(), "--branch", "main", "--default-branch", "main", "--quiet"]
                .map(String::from)
                .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        for (name, value) in example_build_args() {
            args.extend(["--build-arg".into(), format!("{name}={value}")]);
        }
        args.push(repo.path().display().to_string());
        args.push("--".into());
        args.extend(example_docker_args());
        Command::new(cachefrom_binary()).args(&args).env("DOCKER_CONFIG", config_dir.path()).output().unwrap()
    };

    let output = run(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let login_lines: Vec<&str> = stderr.lines().filter(|line| line.contains("docker login 127.0.0.1:5002")).collect();
    assert_eq!(login_lines.len(), 1, "one line naming the fix:\n{stderr}");
    assert!(
        login_lines[0].starts_with("cachefrom: warning: cannot check caches in 127.0.0.1:5002/locked/app"),
        "{}",
        login_lines[0]
    );

    let strict = run(&["--strict-cache"]);
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert_eq!(strict.status.code(), Some(3), "{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|line| line.starts_with("cachefrom: error:")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(error_lines[0].contains("docker login 127.0.0.1:5002"), "{}", error_lines[0]);
}
