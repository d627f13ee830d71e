//! `care-server`: see the crate docs and `docs/SERVING.md`.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in piped logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = care_server::config::Args::parse();
    let server = match care_server::Server::start(&args).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("care-server: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Tests and scripts read the address from this line.
    println!("care-server listening on http://{}", server.addr);
    match server.serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("care-server: {e}");
            ExitCode::from(2)
        }
    }
}
