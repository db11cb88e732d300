//! `sgr`: train networks with end-to-end back-propagation or local learning with SGR. One file
//! per subcommand under `commands/`, each an args struct and a `run` function.

mod args;
mod commands;
mod hub;
#[cfg(feature = "mpi")]
mod mpi;
mod out;
mod plot;

#[global_allocator]
static ALLOC: sgr_run::counting::Counting = sgr_run::counting::Counting;

use clap::{Parser, Subcommand};

use commands::{bench, download, eval, inspect, plot as plot_cmd, train};

#[derive(Parser, Debug)]
#[command(
    name = "sgr",
    version,
    about = "Local learning with Successive Gradient Reconciliation"
)]
struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (default: SGR on the embedded 8x8 digits).
    Train(Box<train::TrainArgs>),
    /// Time training steps on random inputs of the model's shape.
    Bench(Box<bench::BenchArgs>),
    /// Evaluate a trained model (a run directory) on its data set's test split.
    Eval(eval::EvalArgs),
    /// Model summary, split plan, per-module parameters and measured activation memory.
    Inspect(Box<inspect::InspectArgs>),
    /// Fetch a checkpoint from the Hugging Face Hub into the standard cache.
    Download(download::DownloadArgs),
    /// PNG plots of a run: training curves and the per-boundary reconciliation heat map.
    Plot(plot_cmd::PlotArgs),
}

fn main() {
    // `sgr train` keeps training when stdout closes (it ignores SIGPIPE, as Rust programs do,
    // and stops printing); the other commands only print, so they end with their reader.
    let cli = Cli::parse();
    #[cfg(unix)]
    if !matches!(cli.command, Command::Train(_)) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    sgr_core::memory::tune_allocator();
    let pipelined = match &cli.command {
        Command::Train(a) => a.pipelined(),
        Command::Bench(a) => a.pipelined(),
        _ => false,
    };
    if pipelined {
        // Before any other thread exists: the pipeline workers share one arena, so the resident
        // set follows what they hold together, not the sum of their peaks.
        sgr_core::memory::single_arena();
    }
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Train(a) => train::run(*a),
        Command::Bench(a) => bench::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Inspect(a) => inspect::run(*a),
        Command::Download(a) => download::run(a),
        Command::Plot(a) => plot_cmd::run(a),
    };
    if let Err(e) = result {
        if e.is::<out::Closed>() {
            // The reader of stdout went away (`| head -1`): nothing more to say.
            return;
        }
        eprintln!("error: {}", bounded(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// The most characters of an error message printed: a message that echoes a value the user
/// gave (a 100 MB config value, a 4000-character path) keeps its start and its end.
const MAX_ERROR_CHARS: usize = 2000;

/// `message`, its middle left out when it is longer than [`MAX_ERROR_CHARS`].
fn bounded(message: &str) -> std::borrow::Cow<'_, str> {
    let n = message.chars().count();
    if n <= MAX_ERROR_CHARS {
        return message.into();
    }
    let head: String = message.chars().take(MAX_ERROR_CHARS * 3 / 4).collect();
    let tail: String = message.chars().skip(n - MAX_ERROR_CHARS / 4).collect();
    let left_out = n - MAX_ERROR_CHARS;
    format!("{head} […{left_out} characters left out…] {tail}").into()
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = if quiet {
        "error"
    } else {
        match verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SGR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
