//! `proxy`: a reverse proxy in front of web applications, configured from a TOML file.

mod cli;
mod config;
mod run;

/// jemalloc rather than the system allocator: with its background purge thread, memory
/// freed after a burst of connections goes back to the system within seconds.
#[cfg(all(feature = "jemalloc", unix, not(target_env = "musl")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    #[cfg(all(feature = "jemalloc", unix, not(target_env = "musl")))]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("proxy: jemalloc background purging not enabled: {e}");
    }
    cli::main()
}
