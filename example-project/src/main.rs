//! `example-app [--version] [--listen ADDR]`: serve `GET /health` on ADDR (default 127.0.0.1:8080).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut listen = String::from("127.0.0.1:8080");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" | "-V" => {
                println!("{}", example_app::version_line());
                return ExitCode::SUCCESS;
            }
            "--listen" => match args.next() {
                Some(addr) => listen = addr,
                None => {
                    eprintln!("example-app: --listen needs an address, e.g. --listen 127.0.0.1:8080");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("example-app: unknown argument {other:?}; usage: example-app [--version] [--listen ADDR]");
                return ExitCode::from(2);
            }
        }
    }
    let server = match tiny_http::Server::http(&listen) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("example-app: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("example-app: listening on {listen}");
    for request in server.incoming_requests() {
        let (status, body) = example_app::route(request.method().as_str(), request.url());
        let header = tiny_http::Header::from_bytes("Content-Type", "application/json").expect("static header");
        let response = tiny_http::Response::from_string(body).with_status_code(status).with_header(header);
        if let Err(error) = request.respond(response) {
            eprintln!("example-app: cannot answer a request: {error}");
        }
    }
    ExitCode::SUCCESS
}
