//! QEMU's job states, verbs, and which of them go together.

/// The state of a job (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not created yet.
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused by the user or an error.
    Paused,
    /// Done with the bulk of the work; waiting to be completed (mirror).
    Ready,
    /// Ready, and paused.
    Standby,
    /// Finished its work; waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failed or cancelled; cleaning up.
    Aborting,
    /// Finished; waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// Every state, in QEMU's order (the tables' index).
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The name QMP uses.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether QEMU's state transition table allows `self → to`.
    pub fn can_become(self, to: JobStatus) -> bool {
        // Rows: from; columns: to (U C R P Y S W D X E N).
        const STT: [[u8; 11]; 11] = [
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
            [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ];
        STT[self.index()][to.index()] == 1
    }
}

/// What a user can ask of a job (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

impl Verb {
    /// The name QEMU's errors use.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
            Verb::Change => "change",
        }
    }

    /// Whether QEMU's verb table allows this verb in `status`.
    pub fn allowed_in(self, status: JobStatus) -> bool {
        // Columns: U C R P Y S W D X E N.
        let row: [u8; 11] = match self {
            Verb::Cancel => [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
            }
            Verb::Complete => [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
            Verb::Finalize => [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            Verb::Dismiss => [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        };
        row[status.index()] == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_qemus() {
        use JobStatus::*;
        // The life of a job that succeeds, and of one that fails.
        for path in [
            &[
                Undefined, Created, Running, Waiting, Pending, Concluded, Null,
            ][..],
            &[
                Undefined, Created, Running, Ready, Standby, Ready, Waiting, Pending, Concluded,
                Null,
            ],
            &[Running, Paused, Running, Aborting, Concluded],
            &[Created, Aborting, Aborting, Concluded],
        ] {
            for w in path.windows(2) {
                assert!(w[0].can_become(w[1]), "{:?} → {:?}", w[0], w[1]);
            }
        }
        for (from, to) in [
            (Concluded, Running),
            (Pending, Running),
            (Null, Created),
            (Running, Concluded),
        ] {
            assert!(!from.can_become(to), "{from:?} → {to:?}");
        }
        assert!(Verb::Complete.allowed_in(Standby));
        assert!(!Verb::Complete.allowed_in(Running));
        assert!(Verb::Cancel.allowed_in(Pending));
        assert!(!Verb::Cancel.allowed_in(Concluded));
        assert!(Verb::Dismiss.allowed_in(Concluded));
        assert_eq!(
            JobStatus::ALL
                .iter()
                .filter(|s| Verb::Pause.allowed_in(**s))
                .count(),
            5
        );
    }
}
