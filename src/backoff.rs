//! Exponential backoff: a floor, doubling, a cap.

use std::time::Duration;

/// Delays that start at `floor`, double on every [`Backoff::next_delay`] and stop at `cap`.
#[derive(Clone, Debug)]
pub struct Backoff {
    floor: Duration,
    cap: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff from `floor` to `cap` (`cap` is raised to `floor` if lower).
    pub fn new(floor: Duration, cap: Duration) -> Self {
        Self {
            floor,
            cap: cap.max(floor),
            current: floor,
        }
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.cap);
        delay
    }

    /// The delay [`Backoff::next_delay`] would return, without advancing.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// Back to the floor.
    pub fn reset(&mut self) {
        self.current = self.floor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_floor_to_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(25), Duration::from_secs(1));
        let delays: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [25, 50, 100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(25));
    }
}
