//! `weft-bench`: runs declared workloads against Weft and peer brokers, side by side.
//!
//! ```text
//! weft-bench list
//! weft-bench run <workload> [--driver weft|nats[:fsync]|redis[:fsync]|disk] [overrides]
//! weft-bench compare <workload> --drivers weft,nats,redis[,disk] [--rounds 3] [overrides]
//! weft-bench check <result.json>...
//! ```

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use weft_bench::drivers::{self, DriverSpec, Kind};
use weft_bench::result::{self, RunResult};
use weft_bench::runner::{self, RunOptions};
use weft_bench::workload::{self, Workload};
use weft_bench::{chart, compare};

#[derive(Debug, Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Benchmark Weft against peer brokers on declared workloads, at declared durability"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the workloads and which drivers are installed.
    List {
        /// Workload directory (default: the shipped benches/workloads).
        #[arg(long)]
        workloads: Option<PathBuf>,
    },
    /// Runs one workload on one driver; writes result.json and charts.
    Run {
        /// Workload name (in the workload directory) or path to a TOML file.
        workload: String,
        /// weft, nats, nats:fsync, redis, redis:fsync or disk; add @host:port to use a running
        /// server instead of starting one.
        #[arg(long, default_value = "weft")]
        driver: String,
        #[command(flatten)]
        common: Common,
    },
    /// Runs several drivers on one workload in alternating rounds; prints medians and ratios to
    /// Weft. A bare peer name (nats, redis) runs it at both its default and fsync-before-ack.
    Compare {
        /// Workload name or path.
        workload: String,
        /// Comma-separated drivers.
        #[arg(long, default_value = "weft,nats,redis")]
        drivers: String,
        /// Rounds (each runs every driver once).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Freezes (SIGSTOP) the leader of a partition of a three-broker cluster, round after round,
    /// and reports how long until another broker leads it.
    Failover {
        /// Rounds.
        #[arg(long, default_value_t = 8)]
        rounds: usize,
        /// Where the brokers keep their data (default: the system temp dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where the JSON result goes.
        #[arg(long, default_value = "weft-bench-results")]
        out: PathBuf,
    },
    /// Freezes (SIGSTOP) a follower of a partition of a three-broker cluster, publishes through
    /// the leader, resumes the follower and reports how fast it catches up, against the leader's
    /// ingestion of the same records and the raw disk.
    CatchUp {
        /// Records published while the follower is frozen.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Bytes of each record.
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        /// Records per publish (1: as many small entries as the leader makes of them).
        #[arg(long, default_value_t = 1)]
        batch_records: usize,
        /// Most seconds the catch-up may take.
        #[arg(long, default_value_t = 600)]
        limit_seconds: u64,
        /// Where the brokers keep their data (default: the system temp dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where the JSON result goes.
        #[arg(long, default_value = "weft-bench-results")]
        out: PathBuf,
    },
    /// Builds a large partition through a broker, restarts the broker cleanly and after kill -9,
    /// and reports the time until the partition serves and the peak resident memory.
    Restart {
        /// Size of the partition to build, GiB.
        #[arg(long, default_value_t = 10.0)]
        size_gib: f64,
        /// Where the broker keeps its data (default: the system temp dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where the JSON result goes.
        #[arg(long, default_value = "weft-bench-results")]
        out: PathBuf,
    },
    /// Checks result files: well-formed, and the counts add up. Exit 1 if not.
    Check {
        /// result.json files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Workload directory (default: the shipped benches/workloads).
    #[arg(long)]
    workloads: Option<PathBuf>,
    /// Override the measured duration, seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Override the warm-up, seconds.
    #[arg(long)]
    warmup: Option<f64>,
    /// Override the producer rate, msg/s over all producers (0 = max).
    #[arg(long)]
    rate: Option<u64>,
    /// Override the in-flight window per producer.
    #[arg(long)]
    in_flight: Option<usize>,
    /// Override the message size, bytes.
    #[arg(long)]
    message_size: Option<usize>,
    /// Where started servers keep their data (a fresh directory per run is made inside and
    /// removed). Put it on the disk you mean to measure.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where results and charts go.
    #[arg(long, default_value = "weft-bench-results")]
    out: PathBuf,
    /// Seconds to wait after the last send for acknowledgements and for consumers to catch up.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

impl Common {
    fn workload(&self, name: &str) -> Result<Workload> {
        let dir = self.workloads.clone().unwrap_or_else(workload::default_dir);
        let mut w = Workload::load(name, &dir)?;
        if let Some(d) = self.duration {
            w.duration_seconds = d;
        }
        if let Some(d) = self.warmup {
            w.warmup_seconds = d;
        }
        if let Some(r) = self.rate {
            w.producer_rate = r;
        }
        if let Some(n) = self.in_flight {
            w.in_flight = n;
        }
        if let Some(n) = self.message_size {
            w.message_size = n;
        }
        w.validate().context("after the command-line overrides")?;
        Ok(w)
    }

    fn options(&self) -> Result<RunOptions> {
        if !(self.drain_timeout.is_finite() && self.drain_timeout > 0.0) {
            bail!("--drain-timeout must be a positive number of seconds");
        }
        Ok(RunOptions {
            data_dir: self.data_dir.clone().unwrap_or_else(std::env::temp_dir),
            drain_timeout: Duration::from_secs_f64(self.drain_timeout),
            progress: !self.quiet,
        })
    }
}

fn stamp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn main_inner(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::List { workloads } => {
            let dir = workloads.unwrap_or_else(workload::default_dir);
            println!("workloads in {}:", dir.display());
            for name in workload::list(&dir)? {
                match Workload::load(&name, &dir) {
                    Ok(w) => println!("  {name:<20} {}", w.description),
                    Err(e) => println!("  {name:<20} INVALID: {e:#}"),
                }
            }
            println!("drivers:");
            for kind in Kind::ALL {
                match drivers::available(kind) {
                    Ok(()) => println!("  {:<8} installed", kind.name()),
                    Err(e) => println!("  {:<8} unavailable: {e:#}", kind.name()),
                }
            }
            Ok(true)
        }
        Command::Run {
            workload,
            driver,
            common,
        } => {
            let w = common.workload(&workload)?;
            let specs = DriverSpec::parse_list(&driver, false)?;
            let [spec] = specs.as_slice() else {
                bail!("run takes one driver; use compare for several");
            };
            let options = common.options()?;
            let result = runner::run(&w, spec, &options).await?;
            let dir = common.out.join(format!(
                "{}-{}-{}",
                stamp(),
                w.name,
                spec.label().replace(':', "-")
            ));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            result.write(&dir.join("result.json"))?;
            chart::write_run_charts(&dir, &result)?;
            print!("{}", result::table(&[&result]));
            println!(
                "counts: sent {} = acked {} + failed {}; consumed {}",
                result.counts.sent,
                result.counts.acked,
                result.counts.failed,
                result.counts.consumed
            );
            for e in &result.errors {
                println!("error: {e}");
            }
            println!("durability: {}", result.durability_detail);
            println!("wrote {}", dir.display());
            Ok(result.checks.all())
        }
        Command::Compare {
            workload,
            drivers,
            rounds,
            common,
        } => {
            if rounds == 0 || rounds > 100 {
                bail!("--rounds must be 1..=100");
            }
            let w = common.workload(&workload)?;
            let specs = DriverSpec::parse_list(&drivers, true)?;
            let options = common.options()?;
            let dir = common.out.join(format!("{}-compare-{}", stamp(), w.name));
            let comparison = compare::compare(&w, &specs, rounds, &options, &dir).await?;
            print!("{}", compare::table(&comparison));
            println!("wrote {}", dir.display());
            Ok(
                comparison.failures.is_empty()
                    && comparison.drivers.iter().all(|d| d.counts_add_up),
            )
        }
        Command::Failover {
            rounds,
            data_dir,
            out,
        } => {
            if !(1..=1000).contains(&rounds) {
                bail!("--rounds must be in 1..=1000");
            }
            let dir = data_dir.unwrap_or_else(std::env::temp_dir);
            let result = weft_bench::failover::run(rounds, &dir).await?;
            let (min, median, max) = result.summary();
            println!(
                "failover after SIGSTOP of the leader, {rounds} rounds: min {min:.2} s, median \
                 {median:.2} s, max {max:.2} s"
            );
            std::fs::create_dir_all(&out)?;
            let path = out.join(format!("{}-failover.json", stamp()));
            std::fs::write(&path, serde_json::to_vec_pretty(&result)?)?;
            println!("wrote {}", path.display());
            Ok(true)
        }
        Command::CatchUp {
            records,
            record_bytes,
            batch_records,
            limit_seconds,
            data_dir,
            out,
        } => {
            if !(1..=100_000_000).contains(&records)
                || !(1..=(1 << 20)).contains(&record_bytes)
                || !(1..=10_000).contains(&batch_records)
                || !(1..=3600).contains(&limit_seconds)
            {
                bail!(
                    "--records must be in 1..=100000000, --record-bytes in 1..=1048576, \
                     --batch-records in 1..=10000, --limit-seconds in 1..=3600"
                );
            }
            let dir = data_dir.unwrap_or_else(std::env::temp_dir);
            let options = weft_bench::catchup::CatchUpOptions {
                records,
                record_bytes,
                batch_records,
                limit_seconds,
            };
            let r = weft_bench::catchup::run(options, &dir).await?;
            let mib = r.lag_bytes as f64 / f64::from(1 << 20);
            println!(
                "catch-up of {} entries ({mib:.1} MiB): {:.2} s, the first progress after {:.2} s \
                 ({:.0} entries/s, {:.1} MiB/s); the leader took them in {:.2} s ({:.2}x); the \
                 raw disk wrote the bytes in {:.2} s ({:.2}x)",
                r.lag_entries,
                r.catch_up_seconds,
                r.first_progress_seconds,
                r.lag_entries as f64 / r.catch_up_seconds,
                mib / r.catch_up_seconds,
                r.ingest_seconds,
                r.against_ingest(),
                r.disk_seconds,
                r.against_disk()
            );
            std::fs::create_dir_all(&out)?;
            let path = out.join(format!("{}-catch-up.json", stamp()));
            std::fs::write(&path, serde_json::to_vec_pretty(&r)?)?;
            println!("wrote {}", path.display());
            Ok(true)
        }
        Command::Restart {
            size_gib,
            data_dir,
            out,
        } => {
            if !(size_gib.is_finite() && size_gib > 0.0 && size_gib <= 1024.0) {
                bail!("--size-gib must be in (0, 1024]");
            }
            let size = (size_gib * (1u64 << 30) as f64) as u64;
            let dir = data_dir.unwrap_or_else(std::env::temp_dir);
            let result = weft_bench::restart::run(size, &dir).await?;
            println!(
                "partition: {:.2} GiB, {} records, built in {:.1} s (fsync before ack)",
                result.log_bytes as f64 / (1u64 << 30) as f64,
                result.records,
                result.build_seconds
            );
            println!(
                "{:<8} {:>10} {:>14} {:>16} {:>14}",
                "restart", "serves s", "peak RSS MiB", "replayed entries", "replayed MiB"
            );
            for r in &result.restarts {
                println!(
                    "{:<8} {:>10.3} {:>14.1} {:>16} {:>14.1}",
                    r.kind,
                    r.serve_seconds,
                    r.peak_rss_mib,
                    r.replayed_entries,
                    r.replayed_bytes / (1u64 << 20) as f64
                );
            }
            std::fs::create_dir_all(&out)?;
            let path = out.join(format!("{}-restart.json", stamp()));
            std::fs::write(&path, serde_json::to_vec_pretty(&result)?)?;
            println!("wrote {}", path.display());
            Ok(true)
        }
        Command::Check { files } => {
            let mut ok = true;
            for file in files {
                match RunResult::read(&file) {
                    Ok(r) => {
                        let mut recomputed = r.clone();
                        recomputed.compute_checks();
                        let good = recomputed.checks.all() && recomputed.checks == r.checks;
                        println!(
                            "{}: {} {} sent {} acked {} failed {} consumed {}",
                            file.display(),
                            if good { "ok" } else { "BAD" },
                            r.label(),
                            r.counts.sent,
                            r.counts.acked,
                            r.counts.failed,
                            r.counts.consumed
                        );
                        ok &= good;
                    }
                    Err(e) => {
                        println!("{}: BAD {e:#}", file.display());
                        ok = false;
                    }
                }
            }
            Ok(ok)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Off unless asked for: `RUST_LOG=weft_client=debug weft-bench run ...` shows the client's
    // reconnects and ended streams on stderr.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
