//! The `tollgate` binary: everything lives in the library; see `tollgate::cli`.

/// mimalloc instead of glibc malloc: Pingora allocates and frees buffers on every request across
/// threads, and glibc's arenas cost ~15% of a proxied request's CPU (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
