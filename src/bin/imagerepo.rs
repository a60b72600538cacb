//! `imagerepo`: the central image repository server (being built; see issue 9).

fn main() {
    eprintln!("imagerepo: not built yet");
    std::process::exit(1);
}
