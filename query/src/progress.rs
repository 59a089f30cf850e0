//! The progress bar of long operator commands (`query rebuild`, `walletctl rebuild`,
//! `walletctl demo`), drawn in place on standard error.

use std::io::Write as _;

const WIDTH: u64 = 40;

/// Redraws `label [####    ] done/total`; ends the line once `done` reaches `total`.
pub fn draw(label: &str, done: u64, total: u64) {
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    eprint!(
        "\r{label} [{}{}] {done}/{total}",
        "#".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize)
    );
    if done >= total {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
}
