//! The `tollgate` binary: the command line lives in the library (`tollgate::cli`).

fn main() -> anyhow::Result<()> {
    tollgate::cli::main()
}
