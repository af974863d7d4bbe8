//! `stoker-bench` (`make bench`): runs Stoker and the tools it replaces side by
//! side on this machine, prints ratios, and writes BENCHMARKS.md with the
//! machine and the method.

mod controller_sim;
mod convert_bench;
mod demo;
mod fuse_bench;
mod headline;
mod images;
mod layout_bench;
mod load_bench;
mod load_reader;
mod report;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Sections to run (comma-separated): headline, demo, convert, layout, fuse,
    /// load, controller. All by default (about an hour on 2 cores, most of it
    /// building and pulling the headline's Python image the first time).
    #[arg(
        long,
        default_value = "headline,demo,convert,layout,fuse,load,controller",
        value_delimiter = ','
    )]
    sections: Vec<String>,
    /// Smaller inputs for a quick run (not for BENCHMARKS.md).
    #[arg(long)]
    quick: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: std::path::PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// The `load` section's reader, run inside each container.
    #[command(hide = true)]
    ReadFile(load_reader::ReadFileArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::ReadFile(read)) = args.command {
        return load_reader::run(read);
    }
    stoker_registry::install_crypto_provider();
    let size = if args.quick {
        images::MlImageSize::QUICK
    } else {
        images::MlImageSize::FULL
    };
    let mut sections = Vec::new();
    for name in &args.sections {
        let section = match name.as_str() {
            "controller" => controller_sim::run(args.quick)?,
            "convert" => convert_bench::run(size).await?,
            "demo" if args.quick => demo::run(size).await?,
            "demo" => demo::run(images::MlImageSize::DEMO).await?,
            "layout" => layout_bench::run(size).await?,
            "fuse" => fuse_bench::run(args.quick).await?,
            "headline" => headline::run().await?,
            "load" => load_bench::run(args.quick).await?,
            other => anyhow::bail!("unknown section {other:?}"),
        };
        println!("{}", section.markdown());
        sections.push(section);
    }
    let mut text = format!(
        "# Benchmarks\n\nWritten by `make bench` (`stoker-bench`{}). Machine: {}.\n\n",
        if args.quick { " --quick" } else { "" },
        report::machine()
    );
    for section in &sections {
        text.push_str(&section.markdown());
    }
    std::fs::write(&args.out, text)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
