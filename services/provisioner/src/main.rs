//! `bidsflux-provisioner`: see [`bidsflux_provisioner::cli::USAGE`].

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use bidsflux_provisioner::cli::{Command, Target, USAGE, parse_args};
use bidsflux_provisioner::plan::Plan;
use bidsflux_provisioner::{Config, bus, secrets};

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv, std::env::var("DOCKER_HOST").ok().as_deref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bidsflux-provisioner: {e}\n\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    if args.command == Command::Help {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    bidsflux_telemetry::command_main("bidsflux-provisioner", || async move {
        let mut plan = Plan::new(args.dry_run);
        match args.command {
            Command::Bus => {
                let config = Config::from_env(&Env::from_process())?;
                let nats = Bus::connect(&config.nats_url, "provisioner", Duration::from_secs(60)).await?;
                bus(&nats, &mut plan).await?;
            }
            Command::Secrets { target, options } => {
                let store = match target {
                    Target::Swarm(host) => secrets::Store::swarm(&host).await?,
                    Target::Dir(dir) => secrets::Store::Dir(dir),
                };
                secrets::run(&store, &options, &mut plan).await?;
            }
            Command::Help => {}
        }
        Ok(ExitCode::from(plan.exit_code()))
    })
    .await
}
