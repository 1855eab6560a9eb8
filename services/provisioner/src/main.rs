//! `bidsflux-provisioner`: see [`bidsflux_provisioner::cli::USAGE`].

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_gitlab_api::Client;
use bidsflux_messaging::Bus;
use bidsflux_provisioner::cli::{Args, Command, Target, USAGE, parse_args};
use bidsflux_provisioner::plan::Plan;
use bidsflux_provisioner::site::{Settings, Site, admin_token};
use bidsflux_provisioner::{Config, bus, gitlab, runners, secrets};

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
        run(&args, &mut plan).await?;
        Ok(ExitCode::from(plan.exit_code()))
    })
    .await
}

async fn run(args: &Args, plan: &mut Plan) -> anyhow::Result<()> {
    let env = Env::from_process();
    let cmd = args.command;
    // Read every setting before anything is changed.
    let settings = if cmd.runs(Command::Gitlab) || cmd.runs(Command::Runners) {
        let settings = Settings::from_env(&env)?;
        let token = admin_token(&env, args.gitlab_token_file.as_deref())?;
        Some((settings, token))
    } else {
        None
    };
    let config = if cmd.runs(Command::Bus) { Some(Config::from_env(&env)?) } else { None };
    let store = if cmd != Command::Bus {
        Some(match &args.target {
            Target::Swarm(host) => secrets::Store::swarm(host).await?,
            Target::Dir(dir) => secrets::Store::Dir(dir.clone()),
        })
    } else {
        None
    };
    let mut made = std::collections::BTreeMap::new();
    if let (true, Some(store)) = (cmd.runs(Command::Secrets), &store) {
        made = secrets::run(store, &args.options, plan).await?;
    }
    if let (Some((settings, token)), Some(store)) = (&settings, &store) {
        let site = Site {
            api: Client::new(&settings.url, token.clone(), settings.timeout),
            store,
            mounted: args.secrets_from.clone(),
            settings,
            rotate: &args.options.rotate,
            made,
        };
        if cmd.runs(Command::Gitlab) {
            gitlab::run(&site, plan).await?;
        }
        if cmd.runs(Command::Runners) {
            runners::run(&site, plan).await?;
        }
    }
    if let Some(config) = config {
        let nats = Bus::connect(&config.nats_url, "provisioner", Duration::from_secs(60)).await?;
        bus(&nats, plan).await?;
    }
    Ok(())
}
