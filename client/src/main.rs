//! `weft`: the command-line client. Exit status 0 on success, 1 with a one-line reason on stderr
//! on failure, 2 for usage errors, 141 (quietly) when its output's reader went away.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("weft: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The output's reader went away (`weft topic list | head -1`): end quietly, with the
        // status a shell gives a command a closed pipe ended (128 + SIGPIPE).
        Err(e) if cli::closed_pipe(&e) => std::process::ExitCode::from(141),
        Err(e) => {
            eprintln!("weft: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn one_line(error: &anyhow::Error) -> String {
    format!("{error:#}").replace('\n', " ")
}
