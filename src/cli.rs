//! Command-line interface: the gateway (`run`, `check`, `demo`) and the admin API client verbs
//! (`status`, `shift`, `weights`, `rollout`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::{Map, Value};

/// rayshift: a zero-downtime gateway for Ray Serve (route, shard and shift traffic across RayClusters).
#[derive(Debug, Parser)]
#[command(name = "rayshift", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve client traffic with the given config file.
    Run {
        /// The YAML config file.
        #[arg(long, short, env = "RAYSHIFT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when valid, else print every problem and exit 1.
    Check {
        /// The YAML config file.
        #[arg(long, short, env = "RAYSHIFT_CONFIG")]
        config: PathBuf,
    },
    /// Start two local Serve look-alike clusters (blue v1, green v2) and a gateway in front of them.
    Demo {
        /// Client-traffic address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin API address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
        /// Also drive traffic through the gateway and shift shard-0 to green, showing its progress.
        #[arg(long)]
        shift: bool,
    },
    /// Show shards, clusters, weights, shifts and the rollout of a running gateway.
    Status {
        /// Print the raw JSON of GET /v1/state.
        #[arg(long)]
        json: bool,
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Start, control and follow the shift of a shard's traffic to a new cluster or revision.
    #[command(subcommand)]
    Shift(ShiftCommand),
    /// Set a shard's weights by hand.
    #[command(subcommand)]
    Weights(WeightsCommand),
    /// Upgrade every shard to a revision, a few shards at a time.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

/// Where the admin API is and how to authenticate to it (every client verb takes these).
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Base URL of the gateway's admin API.
    #[arg(
        long = "admin",
        value_name = "URL",
        env = "RAYSHIFT_ADMIN",
        default_value = "http://127.0.0.1:9901"
    )]
    pub url: String,
    /// File with the admin token, sent as "Authorization: Bearer <token>" (surrounding whitespace
    /// is trimmed).
    #[arg(long, value_name = "PATH", env = "RAYSHIFT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// `rayshift shift ...`.
#[derive(Debug, Subcommand)]
pub enum ShiftCommand {
    /// Start shifting a shard's traffic to a cluster (--to) or revision (--to-revision).
    Start(ShiftStartArgs),
    /// Hold a shift at its current weights.
    Pause(ShardArgs),
    /// Continue a paused shift (the next step waits a full interval).
    Resume(ShardArgs),
    /// Go to 100% now and drain the old clusters.
    Promote(ShardArgs),
    /// Stop a shift and put the weights back where it started.
    Abort(ShardArgs),
    /// Follow a shift until it completes (exit 0), rolls back (exit 2) or is aborted (exit 3).
    Watch(ShiftWatchArgs),
}

/// A shard and the admin API.
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// The shard.
    #[arg(long)]
    pub shard: String,
    /// Where the admin API is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `rayshift shift start`.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to", "to_revision"])))]
pub struct ShiftStartArgs {
    /// The shard whose traffic moves.
    #[arg(long)]
    pub shard: String,
    /// Move the traffic to this cluster.
    #[arg(long, value_name = "CLUSTER")]
    pub to: Option<String>,
    /// Move the traffic to every cluster of this revision in the shard.
    #[arg(long, value_name = "REV")]
    pub to_revision: Option<String>,
    /// Policy keys (left out: the gateway's shift_defaults).
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Follow the shift after starting it, as `shift watch` does (same exit codes).
    #[arg(long)]
    pub watch: bool,
    /// Poll interval with --watch.
    #[arg(long, value_name = "DUR", default_value = "500ms", value_parser = parse_interval)]
    pub interval: Duration,
    /// Where the admin API is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `rayshift shift watch`.
#[derive(Debug, Clone, Args)]
pub struct ShiftWatchArgs {
    /// The shard whose shift to follow.
    #[arg(long)]
    pub shard: String,
    /// Time between polls.
    #[arg(long, value_name = "DUR", default_value = "500ms", value_parser = parse_interval)]
    pub interval: Duration,
    /// Where the admin API is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Shift policy keys; only those given are sent (the gateway fills in the rest).
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyArgs {
    /// Weight added to the target per step, 1-100 [gateway default: 10].
    #[arg(long, value_name = "N")]
    pub step_percent: Option<u32>,
    /// Time between steps, also the analysis window, e.g. 30s [gateway default: 30s].
    #[arg(long, value_name = "DUR", value_parser = duration_text)]
    pub step_interval: Option<String>,
    /// Highest acceptable error ratio of the target, 0-1 (0.01 = 1%) [gateway default: 0.01].
    #[arg(long, value_name = "R")]
    pub max_error_rate: Option<f64>,
    /// Highest acceptable p99 time to response headers on the target [gateway default: 1s].
    #[arg(long, value_name = "DUR", value_parser = duration_text)]
    pub max_p99_latency: Option<String>,
    /// Requests the target must answer in a window before it is judged [gateway default: 50].
    #[arg(long, value_name = "N")]
    pub min_requests: Option<u64>,
    /// Failed checks in a row that roll the shift back [gateway default: 2].
    #[arg(long, value_name = "N")]
    pub failure_threshold: Option<u32>,
    /// How long the target may stay not ready before the shift rolls back [gateway default: 10m].
    #[arg(long, value_name = "DUR", value_parser = duration_text)]
    pub ready_timeout: Option<String>,
    /// How long old clusters may finish in-flight requests after promotion [gateway default: 5m].
    #[arg(long, value_name = "DUR", value_parser = duration_text)]
    pub drain_timeout: Option<String>,
}

impl PolicyArgs {
    /// The given keys as JSON (numbers as numbers, durations as their text).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                map.insert(key.to_string(), value);
            }
        };
        put("step_percent", self.step_percent.map(Value::from));
        put("step_interval", self.step_interval.clone().map(Value::from));
        put("max_error_rate", self.max_error_rate.map(Value::from));
        put(
            "max_p99_latency",
            self.max_p99_latency.clone().map(Value::from),
        );
        put("min_requests", self.min_requests.map(Value::from));
        put("failure_threshold", self.failure_threshold.map(Value::from));
        put("ready_timeout", self.ready_timeout.clone().map(Value::from));
        put("drain_timeout", self.drain_timeout.clone().map(Value::from));
        map
    }
}

/// `rayshift weights ...`.
#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// Set a shard's weights: integers 0-100 summing to 100; unnamed clusters get 0.
    Set {
        /// The shard.
        #[arg(long)]
        shard: String,
        /// Weights, e.g. blue=70 green=30.
        #[arg(required = true, value_name = "CLUSTER=WEIGHT")]
        weights: Vec<String>,
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `rayshift rollout ...`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start upgrading every shard to a revision.
    Start(RolloutStartArgs),
    /// Hold the rollout (its running shard shifts are paused too).
    Pause(RolloutControlArgs),
    /// Continue a paused rollout.
    Resume(RolloutControlArgs),
    /// Stop the rollout and abort its running shard shifts.
    Abort(RolloutControlArgs),
    /// Show the current or last rollout.
    Status {
        /// Print the raw JSON of GET /v1/rollouts.
        #[arg(long)]
        json: bool,
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `rayshift rollout start`.
#[derive(Debug, Clone, Args)]
pub struct RolloutStartArgs {
    /// The revision every shard moves to.
    #[arg(long, value_name = "REV")]
    pub revision: String,
    /// Most shards shifting at once [gateway default: 1].
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u64>,
    /// Policy keys of every shard shift (left out: the gateway's shift_defaults).
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Where the admin API is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `rayshift rollout pause|resume|abort`.
#[derive(Debug, Clone, Args)]
pub struct RolloutControlArgs {
    /// Only act when the current rollout has this id.
    #[arg(long)]
    pub id: Option<u64>,
    /// Where the admin API is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Parses `500ms`, `2s`, `1m 30s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("expected a duration like 500ms or 2s: {e}"))
}

/// A poll interval: a duration above zero (zero would poll the admin API in a busy loop).
fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("the interval must be longer than 0".to_string()),
        d => Ok(d),
    }
}

/// Checks a duration's text and keeps it as given (the gateway parses it again).
fn duration_text(text: &str) -> Result<String, String> {
    parse_duration(text).map(|_| text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn shift_start_needs_exactly_one_target_and_sends_only_given_keys() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["rayshift"], args].concat());
        assert!(parse(&["shift", "start", "--shard", "s"]).is_err());
        assert!(parse(&[
            "shift",
            "start",
            "--shard",
            "s",
            "--to",
            "g",
            "--to-revision",
            "v2"
        ])
        .is_err());
        assert!(parse(&[
            "shift",
            "start",
            "--shard",
            "s",
            "--to",
            "g",
            "--step-interval",
            "soon"
        ])
        .is_err());
        let cli = parse(&[
            "shift",
            "start",
            "--shard",
            "s",
            "--to",
            "g",
            "--step-percent",
            "50",
            "--step-interval",
            "200ms",
            "--max-error-rate",
            "0.05",
        ])
        .unwrap();
        let Command::Shift(ShiftCommand::Start(args)) = cli.command else {
            panic!("parsed as {cli:?}");
        };
        assert_eq!(
            Value::Object(args.policy.to_json()),
            serde_json::json!({"step_percent": 50, "step_interval": "200ms", "max_error_rate": 0.05})
        );
        assert_eq!(args.interval, Duration::from_millis(500));
    }

    #[test]
    fn watch_interval_must_be_above_zero() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["rayshift"], args].concat());
        let e = parse(&["shift", "watch", "--shard", "s", "--interval", "0s"]).unwrap_err();
        assert!(e.to_string().contains("longer than 0"), "{e}");
        let cli = parse(&["shift", "watch", "--shard", "s", "--interval", "2s"]).unwrap();
        let Command::Shift(ShiftCommand::Watch(args)) = cli.command else {
            panic!("parsed as {cli:?}");
        };
        assert_eq!(args.interval, Duration::from_secs(2));
    }
}
