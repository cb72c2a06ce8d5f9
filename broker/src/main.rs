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
    if flags.check_config {
        // What the broker would start as: its identity and where it keeps its data.
        let peers = if config.peers.is_empty() {
            "a single node".to_string()
        } else {
            format!("{} brokers", config.peers.len())
        };
        println!(
            "weft-broker: the configuration is valid: node {} of {peers}, data in {}, client {}, \
             peer {}, admin {}",
            config.node_id,
            config.data_dir.display(),
            config.client_listen,
            config.peer_listen,
            config.admin_listen
        );
        return std::process::ExitCode::SUCCESS;
    }
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
    if let Err(e) = weft_broker::logging::init(&config.log_format, &config.log_level) {
        eprintln!("weft-broker: {e}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("weft-broker: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // First: a SIGTERM from here on stops the broker gracefully.
        let stop_signal = signal();
        let telemetry = match &config.telemetry.otlp_endpoint {
            Some(endpoint) => Some(
                weft_proto::otel::install_otlp(
                    endpoint,
                    &config.telemetry.service_name,
                    vec![weft_broker::otel::node(config.node_id)],
                )
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let listeners = Listeners::bind(&config).await?;
        let result = run(config, listeners, stop_signal).await;
        if let Some(telemetry) = telemetry {
            // Export what is still queued before the process ends.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        }
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
