//! Ordering of revision labels.

use std::cmp::Ordering;

/// Orders revisions so that `v2 < v10` (digit runs compare as numbers). A total order: labels
/// equal as numbers but written differently (`v02`, `v2`) are told apart byte by byte.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    natural(a.as_bytes(), b.as_bytes()).then_with(|| a.cmp(b))
}

fn natural(mut a: &[u8], mut b: &[u8]) -> Ordering {
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let start = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_order_naturally() {
        let mut revs = vec![
            "v10",
            "v2",
            "v1",
            "v2-rc1",
            "2026-01-03",
            "2026-01-10",
            "v02",
        ];
        revs.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            revs,
            [
                "2026-01-03",
                "2026-01-10",
                "v1",
                "v02",
                "v2",
                "v2-rc1",
                "v10"
            ]
        );
        // Different labels are never equal (automatic shifts would take them for one revision).
        assert_eq!(natural_cmp("v2", "v02"), Ordering::Greater);
        assert_eq!(natural_cmp("v2", "v2"), Ordering::Equal);
        assert_eq!(natural_cmp("v2.0.0", "v2.0-rc1"), Ordering::Greater);
    }
}
