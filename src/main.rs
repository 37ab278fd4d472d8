fn main() {
    std::process::exit(sentiflow::cli::main());
}
