//! How every bench reports a measurement: one JSON object per line (`--json`), or a row of a
//! readable, aligned table. Each bench builds the JSON value and the table cells of a row side
//! by side, so the two outputs always carry the same numbers.

use std::fmt::Write as _;

/// Where rows go: JSON lines or a table with these columns (name, width).
pub struct Report {
    json: bool,
    columns: Vec<(&'static str, usize)>,
}

impl Report {
    /// A report; in table mode the header is printed under `title` at once.
    pub fn new(json: bool, title: &str, columns: &[(&'static str, usize)]) -> Report {
        let report = Report {
            json,
            columns: columns.to_vec(),
        };
        if !json {
            println!("\n{title}");
            let names: Vec<String> = columns.iter().map(|(n, _)| n.to_string()).collect();
            println!("{}", report.line(&names));
        }
        report
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Print one measurement: `value` as a JSON line, or `cells` as a table row.
    pub fn row(&self, value: serde_json::Value, cells: &[String]) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", self.line(cells));
        }
    }

    /// A note under the table (not printed in JSON mode, where `value` says the same).
    pub fn note(&self, value: serde_json::Value, text: &str) {
        if self.json {
            println!("{value}");
        } else {
            println!("  {text}");
        }
    }

    fn line(&self, cells: &[String]) -> String {
        let mut s = String::new();
        for (i, ((_, w), cell)) in self.columns.iter().zip(cells).enumerate() {
            if i == 0 {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, " {cell:>w$}");
            }
        }
        s
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// A number with `d` decimals.
pub fn f(x: f64, d: usize) -> String {
    format!("{x:.d$}")
}
