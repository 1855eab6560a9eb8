//! Time without a date library: ISO 8601 timestamps (`created_at`), today's
//! date (token expiry) and the `YYYY-MM-DD` check of date parameters.

use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's civil_from_days).
pub(crate) fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Now as GitLab writes timestamps: `2024-01-01T12:00:00.000Z` (UTC).
pub(crate) fn now_iso() -> String {
    let s = unix_now();
    let (y, m, d) = civil((s / 86_400) as i64);
    let t = s % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z", t / 3600, t % 3600 / 60, t % 60)
}

/// Today (UTC) as `YYYY-MM-DD`.
pub(crate) fn today() -> String {
    let (y, m, d) = civil((unix_now() / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The date (UTC) `days` days from today as `YYYY-MM-DD`.
pub(crate) fn date_in_days(days: i64) -> String {
    let (y, m, d) = civil((unix_now() / 86_400) as i64 + days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Whether `s` looks like `YYYY-MM-DD`.
pub(crate) fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert!(is_date("2024-02-29"));
        assert!(!is_date("2024-2-29"));
        assert_eq!(date_in_days(0), today());
        assert!(date_in_days(7) > today());
    }
}
