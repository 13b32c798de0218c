//! Slot accuracy: does the sentence say what the meaning representation asked for?
//!
//! BLEU rewards n-grams shared with the references, so an output about the wrong restaurant
//! that is phrased like the references still scores well. Slot accuracy asks the question a
//! reader asks: for each held-out MR that has the slot, does the output contain the slot's
//! value? Four slots, the ones a sentence states word for word: `name` (`Aromi`), `food`
//! (`Chinese`, `Fast food`), `area` (`city centre`, `riverside`) and `near` (`Crowne Plaza
//! Hotel`). Matching ignores case (`Fast food` is written `fast food` mid-sentence). The other
//! slots (price, rating, family friendly, type) are paraphrased too freely for a string match.
//!
//! For scale, the human references themselves contain the value in 100 % (name, near),
//! 84 % (food) and 79 % (area) of cases: people write "in the centre of the city".

use std::fmt;

/// The slots scored, in the order they are reported.
pub const SLOTS: [&str; 4] = ["name", "food", "area", "near"];

/// Hits and counts per slot of [`SLOTS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotAccuracy {
    /// For each slot: outputs that contain the value, MRs that have the slot.
    pub counts: [(usize, usize); 4],
}

impl SlotAccuracy {
    /// Score `outputs[i]` against `mrs[i]`.
    pub fn score<'a>(mrs: impl IntoIterator<Item = &'a str>, outputs: &[String]) -> Self {
        let mut acc = SlotAccuracy::default();
        for (mr, out) in mrs.into_iter().zip(outputs) {
            let out = out.to_lowercase();
            for (slot, value) in slots(mr) {
                if let Some(i) = SLOTS.iter().position(|s| *s == slot) {
                    acc.counts[i].1 += 1;
                    acc.counts[i].0 += usize::from(out.contains(&value.to_lowercase()));
                }
            }
        }
        acc
    }

    /// The share of MRs with `slot` whose output contains its value, in percent (`None` if no
    /// MR has the slot).
    pub fn percent(&self, slot: &str) -> Option<f64> {
        let i = SLOTS.iter().position(|s| *s == slot)?;
        let (hit, n) = self.counts[i];
        (n > 0).then(|| 100.0 * hit as f64 / n as f64)
    }

    /// `{"name": 92.4, ...}` (slots no MR has are left out).
    pub fn to_json(&self) -> serde_json::Value {
        SLOTS
            .iter()
            .filter_map(|s| Some((s.to_string(), self.percent(s)?.into())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

impl fmt::Display for SlotAccuracy {
    /// `name 92 % · food 90 % · area 97 % · near 88 %`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = SLOTS
            .iter()
            .filter_map(|s| Some(format!("{s} {:.0} %", self.percent(s)?)))
            .collect();
        write!(f, "{}", parts.join(" · "))
    }
}

/// The `(slot, value)` pairs of an MR: `name : Aromi | food : Chinese` gives `("name",
/// "Aromi")`, `("food", "Chinese")`. Parts without a `:` are skipped.
pub fn slots(mr: &str) -> impl Iterator<Item = (&str, &str)> {
    mr.split('|').filter_map(|part| {
        let (k, v) = part.split_once(':')?;
        Some((k.trim(), v.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_values_found_in_the_outputs_ignoring_case() {
        let mrs = [
            "name : Aromi | food : Fast food | area : city centre",
            "name : The Eagle | near : Burger King",
            "name : Zizzi | food : Chinese",
        ];
        let outs = [
            "Aromi serves fast food in the city centre .".to_string(),
            "The Wrestlers is near Burger King .".to_string(),
            "Zizzi is a pub .".to_string(),
        ];
        let acc = SlotAccuracy::score(mrs, &outs);
        assert_eq!(acc.counts, [(2, 3), (1, 2), (1, 1), (1, 1)]);
        assert_eq!(acc.percent("food"), Some(50.0));
        assert_eq!(
            acc.to_string(),
            "name 67 % · food 50 % · area 100 % · near 100 %"
        );
        assert_eq!(acc.to_json()["name"], serde_json::json!(200.0 / 3.0));
    }

    #[test]
    fn slots_absent_from_every_mr_are_not_reported() {
        let acc = SlotAccuracy::score(["name : A"], &["A .".to_string()]);
        assert_eq!(acc.percent("near"), None);
        assert_eq!(acc.to_string(), "name 100 %");
        assert_eq!(
            slots("a : 1 | junk | b : x : y").collect::<Vec<_>>(),
            [("a", "1"), ("b", "x : y")]
        );
    }
}
