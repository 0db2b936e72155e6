//! Calendar budget windows in UTC: which window an instant falls in, and when it resets.

use crate::config::Window;

/// Start (inclusive) and end (exclusive) of the window containing `now_us`, in Unix microseconds.
pub fn bounds(window: Window, now_us: i64) -> (i64, i64) {
    const MIN: i64 = 60_000_000;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;
    let floor = |unit: i64| now_us.div_euclid(unit) * unit;
    match window {
        Window::Minute => (floor(MIN), floor(MIN) + MIN),
        Window::Hour => (floor(HOUR), floor(HOUR) + HOUR),
        Window::Day => (floor(DAY), floor(DAY) + DAY),
        Window::Month => {
            let days = now_us.div_euclid(DAY);
            let (y, m, _) = civil_from_days(days);
            let start = days_from_civil(y, m, 1) * DAY;
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (start, days_from_civil(ny, nm, 1) * DAY)
        }
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn windows_are_calendar_aligned() {
        // 2026-11-22T10:30:15Z
        let t = 1_795_343_415_000_000;
        assert_eq!(
            bounds(Window::Minute, t),
            (1_795_343_400_000_000, 1_795_343_460_000_000)
        );
        assert_eq!(bounds(Window::Hour, t).0, 1_795_341_600_000_000);
        assert_eq!(
            bounds(Window::Day, t),
            (
                days_from_civil(2026, 11, 22) * DAY,
                days_from_civil(2026, 11, 23) * DAY
            )
        );
        assert_eq!(
            bounds(Window::Month, t),
            (
                days_from_civil(2026, 11, 1) * DAY,
                days_from_civil(2026, 12, 1) * DAY
            )
        );
    }

    #[test]
    fn months_roll_over_years_and_leap_days() {
        let dec = days_from_civil(2026, 12, 31) * DAY;
        assert_eq!(
            bounds(Window::Month, dec).1,
            days_from_civil(2027, 1, 1) * DAY
        );
        let feb = days_from_civil(2028, 2, 29) * DAY;
        assert_eq!(
            bounds(Window::Month, feb),
            (
                days_from_civil(2028, 2, 1) * DAY,
                days_from_civil(2028, 3, 1) * DAY
            )
        );
        for z in [-1000, 0, 19_000, 20_779, 60_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }
}
