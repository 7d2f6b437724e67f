//! The UK's civil time: GMT, and British Summer Time from 01:00 UTC on the last Sunday of
//! March to 01:00 UTC on the last Sunday of October (the Summer Time Order 2002). Working
//! hours (breach detection's `unusual_hours`) are read in it, and so is the day on which
//! ages and TPS checks are judged: a TPS check's window ends at midnight in the UK, not at
//! midnight UTC, an hour later in summer.

use time::{Date, Duration, Month, OffsetDateTime};

/// Whether `utc` falls in British Summer Time.
pub fn british_summer_time(utc: OffsetDateTime) -> bool {
    let last_sunday_0100 = |month: Month| {
        let last = Date::from_calendar_date(utc.year(), month, 31).ok()?;
        let back = last.weekday().number_days_from_sunday();
        let day = last.checked_sub(Duration::days(i64::from(back)))?;
        Some(day.with_hms(1, 0, 0).ok()?.assume_utc())
    };
    match (
        last_sunday_0100(Month::March),
        last_sunday_0100(Month::October),
    ) {
        (Some(start), Some(end)) => start <= utc && utc < end,
        _ => false,
    }
}

/// The date in the UK at `utc`.
pub fn uk_date(utc: OffsetDateTime) -> Date {
    if british_summer_time(utc) {
        (utc + Duration::hours(1)).date()
    } else {
        utc.date()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// Half past midnight in a British summer is still the day before in UTC: the UK's date
    /// is the next one. In winter the two agree.
    #[test]
    fn the_uk_date_runs_an_hour_ahead_in_summer() {
        let summer = datetime!(2026-06-10 23:30 UTC);
        assert_eq!(uk_date(summer), time::macros::date!(2026 - 06 - 11));
        let winter = datetime!(2026-12-10 23:30 UTC);
        assert_eq!(uk_date(winter), time::macros::date!(2026 - 12 - 10));
        assert!(!british_summer_time(datetime!(2026-03-29 00:59 UTC)));
        assert!(british_summer_time(datetime!(2026-03-29 01:00 UTC)));
        assert!(british_summer_time(datetime!(2026-10-25 00:59 UTC)));
        assert!(!british_summer_time(datetime!(2026-10-25 01:00 UTC)));
    }
}
