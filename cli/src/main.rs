//! `stoker`: the command-line tool around Stoker's lazy image format.
//!
//! - `stoker convert SRC` converts an image and stores the artifact next to it;
//! - `stoker inspect REF` and `stoker ls REF PATH` read an artifact's index;
//! - `stoker mount REF DIR` mounts an image lazily (see the agent for containers);
//! - `stoker plan TRACE…` merges startup traces into a prefetch plan.

mod convert_cmd;
mod image_args;
mod inspect_cmd;
mod mount_cmd;
mod plan_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stoker",
    version,
    about = "Lazy container images: convert, inspect, mount"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `debug` or `stoker_registry=trace`.
    #[arg(long, global = true, env = "STOKER_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image (registry reference or oci:DIR[:TAG]) and store the artifact beside it.
    Convert(convert_cmd::ConvertArgs),
    /// Print the summary of an image's Stoker artifact.
    Inspect(inspect_cmd::InspectArgs),
    /// List a directory of an image from its index alone.
    Ls(inspect_cmd::LsArgs),
    /// Mount a converted image lazily at a directory (foreground; Ctrl-C unmounts).
    Mount(mount_cmd::MountArgs),
    /// Unmount a `stoker mount`.
    Unmount(mount_cmd::UnmountArgs),
    /// Merge startup traces of one image into a prefetch plan (and optionally attach it).
    Plan(plan_cmd::PlanArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    stoker_registry::install_crypto_provider();
    let result = match cli.command {
        Command::Convert(args) => convert_cmd::run(args).await,
        Command::Inspect(args) => inspect_cmd::inspect(args).await,
        Command::Ls(args) => inspect_cmd::ls(args).await,
        Command::Mount(args) => mount_cmd::mount(args).await,
        Command::Unmount(args) => mount_cmd::unmount(args),
        Command::Plan(args) => plan_cmd::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoker: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
