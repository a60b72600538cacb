//! `imagectl`: the command line of the imaged host agent (see [`imaged::cli`]).

fn main() -> std::process::ExitCode {
    imaged::cli::main()
}
