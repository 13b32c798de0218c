//! The `Display` tables of [`super::Spectra`] and [`super::Similarities`].

use std::fmt;

use super::{Similarities, Spectra};

/// At most this many singular values per row of the table.
const SHOWN: usize = 8;

/// Four significant digits: fixed-point for 0.001 ≤ |v| < 10⁴, else scientific.
fn sig(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e4).contains(&v.abs()) {
        let decimals = (3 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.3e}")
    }
}

impl fmt::Display for Spectra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "singular values of ΔW = s·B·A (descending), per layer and target"
        )?;
        writeln!(
            f,
            "{:>5} {:<6} {:>3} {:>7} {:>9} {:>7}  σ1, σ2, …",
            "layer", "target", "r", "s", "‖ΔW‖_F", "σ1²/Σσ²"
        )?;
        for s in &self.sites {
            let shown: Vec<String> = s
                .singular_values
                .iter()
                .take(SHOWN)
                .map(|&v| sig(v))
                .collect();
            let more = if s.singular_values.len() > SHOWN {
                ", …"
            } else {
                ""
            };
            writeln!(
                f,
                "{:>5} {:<6} {:>3} {:>7} {:>9} {:>7.3}  {}{more}",
                s.layer,
                s.target.name(),
                s.r,
                sig(f64::from(s.scale)),
                sig(s.norm()),
                s.top_share(),
                shown.join(", ")
            )?;
        }
        Ok(())
    }
}

/// 1, 2, 4, … up to n, and n itself: the columns (or rows) a table shows.
fn ticks(n: usize) -> Vec<usize> {
    let mut t: Vec<usize> = std::iter::successors(Some(1), |&k| Some(k * 2))
        .take_while(|&k| k < n)
        .collect();
    t.push(n);
    t
}

impl fmt::Display for Similarities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "subspace similarity φ(A1, A2, i, j) = ‖U_A1,iᵀ·U_A2,j‖_F² / min(i, j)"
        )?;
        writeln!(
            f,
            "(U_A,i: top-i right-singular vectors of A; 1 = contained, 0 = orthogonal)"
        )?;
        for s in &self.sites {
            let (rows, cols) = (ticks(s.r1()), ticks(s.r2()));
            writeln!(
                f,
                "\nh.{} {} (r1 = {}, r2 = {})",
                s.layer,
                s.target.name(),
                s.r1(),
                s.r2()
            )?;
            write!(f, "{:>5}", "i\\j")?;
            for j in &cols {
                write!(f, " {j:>6}")?;
            }
            writeln!(f)?;
            for &i in &rows {
                write!(f, "{i:>5}")?;
                for &j in &cols {
                    write!(f, " {:>6.3}", s.phi(i, j))?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_print_four_significant_digits() {
        assert_eq!(
            [sig(2.0), sig(16.6474), sig(0.012345), sig(0.0)],
            ["2.000", "16.65", "0.01235", "0"]
        );
        assert_eq!([sig(2.5e-5), sig(123456.0)], ["2.500e-5", "1.235e5"]);
    }
}
