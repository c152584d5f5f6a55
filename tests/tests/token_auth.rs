//! The registry's token authentication, for real: Debian's registry with `auth: token`, and a
//! token issuer on loopback that answers `GET /token?service=…&scope=…` with an ES256-signed JWT
//! for a user it knows (Basic auth), as Docker Hub, GHCR and GitLab's registries do. cachefrom's
//! existence checks and manifest copies, docker's login and BuildKit's cache export all go
//! through it; the second run on a fresh runner reads every stage from the cache.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use cachefrom_tests::*;

const SERVICE: &str = "cachefrom-test-registry";
const ISSUER: &str = "cachefrom-test-issuer";
const USER: &str = "ci";
const PASSWORD: &str = "token-flow-password";

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token issuer: signs a JWT granting what each `scope` asks, for `USER`/`PASSWORD` only.
struct Issuer {
    address: String,
    cert_pem: String,
    /// Tokens handed out.
    issued: Arc<AtomicUsize>,
}

impl Issuer {
    fn start() -> Issuer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["token-issuer.local".to_string()]).unwrap().self_signed(&key).unwrap();
        let cert_der = cert.der().to_vec();
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&issued);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut authorization = None;
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap_or(("", ""));
                    match name.trim().to_ascii_lowercase().as_str() {
                        "authorization" => authorization = Some(value.trim().to_string()),
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        _ => {}
                    }
                }
                let mut body = vec![0u8; length];
                let _ = std::io::Read::read_exact(&mut reader, &mut body);
                let mut stream = stream;
                let respond = |stream: &mut std::net::TcpStream, status: &str, body: &str| {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                };
                let mut words = request_line.split_whitespace();
                let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                // The OAuth2 POST flow is optional: clients fall back to GET on 404.
                if method != "GET" || !target.starts_with("/token") {
                    respond(&mut stream, "404 Not Found", "{}");
                    continue;
                }
                let expected =
                    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")));
                if authorization.as_deref() != Some(expected.as_str()) {
                    respond(&mut stream, "401 Unauthorized", r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
                    continue;
                }
                let query = target.split_once('?').map(|(_, query)| query).unwrap_or("");
                let access: Vec<serde_json::Value> = query
                    .split('&')
                    .filter_map(|pair| pair.strip_prefix("scope="))
                    .map(|scope| scope.replace("%3A", ":").replace("%2F", "/").replace("%2C", ","))
                    .filter_map(|scope| {
                        let mut parts = scope.splitn(3, ':');
                        let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                        Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                    })
                    .collect();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [base64::engine::general_purpose::STANDARD.encode(&cert_der)]});
                let claims = serde_json::json!({
                    "iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 600, "nbf": now - 60, "iat": now,
                    "jti": format!("{now}-{}", counter.load(Ordering::SeqCst)), "access": access,
                });
                let signing_input =
                    format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
                let signature = signer.sign(&rng, signing_input.as_bytes()).unwrap();
                let token = format!("{signing_input}.{}", b64url(signature.as_ref()));
                counter.fetch_add(1, Ordering::SeqCst);
                respond(
                    &mut stream,
                    "200 OK",
                    &serde_json::json!({"token": token, "access_token": token, "expires_in": 600}).to_string(),
                );
            }
        });
        Issuer { address, cert_pem: cert.pem(), issued }
    }
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_registry_with_token_authentication_serves_every_cache() {
    let _serial = serial();
    need_stack("a_registry_with_token_authentication_serves_every_cache");
    let issuer = Issuer::start();
    let registry = TempRegistry::start_with_auth_config(5004, |dir| {
        let bundle = dir.join("issuer.pem");
        std::fs::write(&bundle, &issuer.cert_pem)?;
        Ok(format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            issuer.address,
            bundle.display()
        ))
    })
    .unwrap();
    let config = tempfile::tempdir().unwrap();
    let image = format!("{}/token/app", registry.address);

    // Anonymous: refused, with a bearer challenge naming the issuer.
    let anonymous = ureq::get(&format!("http://{}/v2/", registry.address)).call();
    let Err(ureq::Error::StatusCode(401)) = anonymous else { panic!("the registry must want a token: {anonymous:?}") };

    let login = duct::cmd!("docker", "login", &registry.address, "-u", USER, "--password-stdin")
        .env("DOCKER_CONFIG", config.path())
        .stdin_bytes(PASSWORD)
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap();
    assert!(login.status.success(), "docker login: {}", String::from_utf8_lossy(&login.stdout));
    assert!(issuer.issued.load(Ordering::SeqCst) > 0, "the login went through the issuer");

    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let report = project.path().join("report.json");
    let run = || {
        let output = std::process::Command::new(cachefrom_binary())
            .args(["build", "--quiet", "--image", &image, "--branch", "main", "--default-branch", "main"])
            .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--strict-cache", "--report"])
            .arg(&report)
            .arg(project.path())
            .args(["--", "--network=none"])
            .env("DOCKER_CONFIG", config.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "{stderr}");
        assert!(!stderr.contains(PASSWORD), "{stderr}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        report
    };

    fresh_runner().unwrap();
    let before = issuer.issued.load(Ordering::SeqCst);
    let seed = run();
    assert!(issuer.issued.load(Ordering::SeqCst) > before, "the build's pushes went through the issuer");
    assert_eq!(seed["warnings"], serde_json::json!([]), "{seed:#}");

    // cachefrom's own client checks and copies tags with tokens: the commit and unprefixed tags
    // are copies of the branch tag's manifest.
    let tags = duct::cmd!("docker", "buildx", "imagetools", "inspect", format!("{image}:cache-runtime"))
        .env("DOCKER_CONFIG", config.path())
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap();
    assert!(tags.status.success(), "the unprefixed tag was written: {}", String::from_utf8_lossy(&tags.stdout));

    fresh_runner().unwrap();
    let again = run();
    assert_eq!(again["level"], "branch", "the existence check found the branch's cache: {again:#}");
    for stage in again["stages"].as_array().unwrap() {
        assert_eq!(stage["steps_cached"], stage["steps_total"], "{again:#}");
    }
    // The build cache now holds results pulled lazily from this registry, which stops with the
    // test: leave the next test a fresh runner.
    fresh_runner().unwrap();
}
