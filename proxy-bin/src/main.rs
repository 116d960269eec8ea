//! `proxy`: a reverse proxy in front of web applications, configured from a TOML file.

mod cli;
mod config;
mod run;

fn main() -> std::process::ExitCode {
    cli::main()
}
