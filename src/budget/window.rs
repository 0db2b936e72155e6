//! Calendar budget windows in UTC: which window an instant falls in, and when it resets.

use crate::clock::{civil_from_days, days_from_civil};
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
