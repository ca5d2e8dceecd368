//! The `edgegate` command: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use edgegate::commands::cli::{self, exit};

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "Edge event gateway: MQTT broker, rules, durable store-and-forward"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (built-in defaults without --config).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration: exit 0 if valid, else list every error with its key (exit 78).
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show the whole mission on one machine: sensors, gateway, a cloud broker, an outage.
    Demo {
        /// Length of the demo in seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Run recorded readings through the rules offline and print the resulting events.
    Backtest {
        /// Rules from this configuration (default: the built-in default rules).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// CSV (`timestamp,value[,topic]`, or one sensor per column) or JSON lines; `-` for
        /// standard input. With --labels: a directory, every *.csv under it one series.
        #[arg(long, short)]
        input: PathBuf,
        /// Topic of readings without a topic column.
        #[arg(long, short)]
        topic: Option<String>,
        /// Print `timestamp,value,score,alert` per reading instead of the events.
        #[arg(long)]
        scores: bool,
        /// Score the alerts against incident windows: a JSON object mapping each file's path
        /// relative to --input to a list of [start, end] timestamps.
        #[arg(long, conflicts_with = "scores")]
        labels: Option<PathBuf>,
        /// With --labels: one JSON object instead of a table.
        #[arg(long, requires = "labels")]
        json: bool,
        /// With --labels: share of each series whose alerts are not scored (learning time).
        #[arg(long, default_value_t = edgegate::rules::backtest::score::PROBATION)]
        probation: f64,
    },
    /// Set USER's password in the broker password file FILE (argon2id), reading the password
    /// from the first line of standard input. Creates FILE (mode 0600) if needed.
    Passwd { file: PathBuf, user: String },
    /// Inspect the store-and-forward queue (works while the daemon runs).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Rules for a fleet of gateways, through the cloud broker (README, "Fleet rules").
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
}

/// The cloud broker and where the gateways' topics are.
#[derive(Args)]
struct UpstreamArgs {
    /// The cloud broker: mqtt://host[:port] or mqtts://host[:port].
    #[arg(long)]
    upstream: String,
    #[arg(long)]
    username: Option<String>,
    /// A file whose first line is the password.
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
    /// CA certificates (PEM) for mqtts:// (default: the system trust store).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The gateways' upstream.topic_prefix, {id} standing for the gateway id.
    #[arg(long, default_value = "edge/{id}")]
    prefix: String,
    /// The gateways' fleet.group_prefix.
    #[arg(long, default_value = "fleet/{group}")]
    group_prefix: String,
}

impl UpstreamArgs {
    fn into_upstream(self) -> edgegate::commands::fleet::Upstream {
        edgegate::commands::fleet::Upstream {
            url: self.upstream,
            username: self.username,
            password_file: self.password_file,
            ca_file: self.ca_file,
            prefix: self.prefix,
            group_prefix: self.group_prefix,
        }
    }
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Check a rules document, publish it retained for a group (default: the group "all") or
    /// one gateway, and print what each gateway did with it: applied, refused (with the
    /// errors) or not answering. Exit 0 when all applied, 65 if any refused, 75 if any is silent.
    Push {
        #[command(flatten)]
        upstream: UpstreamArgs,
        /// A group of gateways (fleet.groups).
        #[arg(long, conflicts_with = "gateway")]
        group: Option<String>,
        /// One gateway, by gateway.id.
        #[arg(long)]
        gateway: Option<String>,
        /// Sign with this key (made by `edgegate fleet keygen`).
        #[arg(long)]
        sign: Option<PathBuf>,
        /// How long to wait for the gateways' states.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// The gateways' fleet.max_document_size, in bytes.
        #[arg(long, default_value_t = 256 * 1024)]
        max_size: usize,
        /// The rules document: [[rules]] as in a rules_engine.dir file.
        file: PathBuf,
    },
    /// Every gateway's state from the retained messages: online, version, rules, backlog, health.
    Status {
        #[command(flatten)]
        upstream: UpstreamArgs,
        /// The states as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Make a signing key: written to FILE (mode 0600); its public key for fleet.trusted_keys
    /// is printed.
    Keygen { file: PathBuf },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, bytes, age of the oldest event, in/out rates, time to drain.
    Stats {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// How long to watch the queue to measure rates (e.g. 1s, 0s to skip).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// The oldest events, one JSON line each.
    Peek {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
        /// Only events whose original topic matches this MQTT filter.
        #[arg(long)]
        topic: Option<String>,
        /// The events set aside because the upstream cannot accept them, with the reason.
        #[arg(long)]
        parked: bool,
    },
    /// Delete queued events (asks for confirmation unless --yes). Not while the gateway runs.
    Purge {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only events older than this (e.g. 7days).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        #[arg(long)]
        topic: Option<String>,
        /// Delete parked events (set aside) instead of queued ones.
        #[arg(long)]
        parked: bool,
        #[arg(long)]
        yes: bool,
    },
    /// Every queued event as JSON lines (for a support ticket or a manual replay).
    Export {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        topic: Option<String>,
        /// The parked events (set aside) instead of the queued ones.
        #[arg(long)]
        parked: bool,
    },
    /// Queue parked events (set aside because the upstream could not accept them) again.
    Retry {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        topic: Option<String>,
    },
    /// Send acknowledged events kept by queue.keep_acked upstream again (same ids).
    Replay {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// RFC 3339 time, or a duration ago (e.g. 2h).
        #[arg(long)]
        since: String,
        #[arg(long)]
        topic: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => cli::check_config(config.as_deref()),
        Command::Passwd { file, user } => cli::passwd(&file, &user),
        Command::Demo { seconds } => edgegate::commands::demo::main(seconds),
        Command::Backtest {
            config,
            input,
            topic,
            scores,
            labels,
            json,
            probation,
        } => edgegate::commands::backtest::main(&edgegate::commands::backtest::Options {
            config: config.as_deref(),
            input: &input,
            topic: topic.as_deref(),
            scores,
            labels: labels.as_deref(),
            json,
            probation,
        }),
        Command::Fleet { command } => match command {
            FleetCommand::Push {
                upstream,
                group,
                gateway,
                sign,
                timeout,
                max_size,
                file,
            } => edgegate::commands::fleet::push(
                &upstream.into_upstream(),
                &edgegate::commands::fleet::Push {
                    file: &file,
                    group: group.as_deref(),
                    gateway: gateway.as_deref(),
                    sign: sign.as_deref(),
                    max_size,
                    timeout,
                },
            ),
            FleetCommand::Status { upstream, json } => {
                edgegate::commands::fleet::status(&upstream.into_upstream(), json)
            }
            FleetCommand::Keygen { file } => edgegate::commands::fleet::keygen(&file),
        },
        Command::Queue { command } => match command {
            QueueCommand::Stats {
                config,
                json,
                interval,
            } => cli::queue_stats(config.as_deref(), json, interval),
            QueueCommand::Peek {
                config,
                n,
                topic,
                parked,
            } => cli::queue_peek(config.as_deref(), n, topic.as_deref(), parked),
            QueueCommand::Purge {
                config,
                older_than,
                topic,
                parked,
                yes,
            } => cli::queue_purge(config.as_deref(), older_than, topic.as_deref(), parked, yes),
            QueueCommand::Export {
                config,
                topic,
                parked,
            } => cli::queue_export(config.as_deref(), topic.as_deref(), parked),
            QueueCommand::Retry { config, topic } => {
                cli::queue_retry(config.as_deref(), topic.as_deref())
            }
            QueueCommand::Replay {
                config,
                since,
                topic,
            } => cli::queue_replay(config.as_deref(), &since, topic.as_deref()),
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn run(path: Option<PathBuf>) -> i32 {
    let config = match cli::load_config(path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    edgegate::app::logging::init(&config.gateway.log_level);
    edgegate::app::allocator::tune();
    edgegate::init_crypto();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgegate: cannot start the runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    runtime.block_on(async move {
        let shutdown = shutdown_signal();
        match edgegate::run(config, shutdown).await {
            Ok(_) => exit::OK,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("edgegate: {e}");
                cli::start_error_code(&e)
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT. Registers the handlers at once (call it inside the runtime,
/// before starting), so a signal during startup is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let term = async {
            match term {
                Some(mut t) => t.recv().await,
                None => std::future::pending().await,
            }
        };
        let int = async {
            match int {
                Some(mut i) => i.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => tracing::info!("SIGTERM"),
            _ = int => tracing::info!("SIGINT"),
        }
    }
}
