//! `weft-broker`: parse flags and config, bind, run until SIGTERM/SIGINT. Everything else lives in
//! the library (`weft_broker::server::run`).

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use weft_broker::config::{Config, Flags};
use weft_broker::server::{Listeners, run, signal};

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match Config::load(&flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("weft-broker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if flags.print_config {
        match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                return std::process::ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("weft-broker: cannot print the config: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    if let Err(e) = weft_broker::sync_journal::install_from_env() {
        eprintln!("weft-broker: {e}");
        return std::process::ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("weft-broker: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        run(config, listeners, signal()).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
