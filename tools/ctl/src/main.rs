//! `bidsflux-ctl`: operator CLI over the study-completion admin API (see the library docs).

use std::process::ExitCode;

use bidsflux_ctl::{DEFAULT_SERVER, USAGE, parse_args, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let server = std::env::var("BIDSFLUX_CTL_SERVER").unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
    let args = match parse_args(&args, &server) {
        Ok(a) => a,
        Err(e) if e.0 == "help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bidsflux-ctl: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bidsflux-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
