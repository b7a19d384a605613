//! Table and JSON rendering of command results.

use bytesize::ByteSize;
use comfy_table::{Table, presets};
use serde::Serialize;

/// How list and show commands print their results.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// A JSON array (lists) or object (single items) for scripts.
    Json,
}

/// Prints `rows` as a table with `header`, or `items` as a JSON array.
pub fn print_list<T: Serialize>(
    format: Format,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(items)?),
        Format::Table => {
            let mut table = Table::new();
            table
                .load_style(presets::NOTHING)
                .set_header(header.to_vec());
            for item in items {
                table.add_row(row(item));
            }
            println!("{table}");
        }
    }
    Ok(())
}

/// Prints one item as JSON, or the `text` line for people.
pub fn print_item<T: Serialize>(format: Format, item: &T, text: &str) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(item)?),
        Format::Table => println!("{text}"),
    }
    Ok(())
}

/// Formats a byte count with IEC units (`1.0 GiB`).
pub fn bytes(n: u64) -> String {
    ByteSize(n).display().iec().to_string()
}
