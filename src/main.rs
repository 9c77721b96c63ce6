//! `dmabuf-p2p`: the command-line tool.

fn main() {
    println!("dmabuf-p2p {}", env!("CARGO_PKG_VERSION"));
}
