"""The control interface: a local administrator's per-file holds and change journal.

Built on the mechanism the daemon already has for coherence: every guest
modification runs inside `HostDaemon.modification`, and every host-local
write through the marked mount waits in its fanotify pre-content event until
the daemon answers.  Both now pass one gate (`holds.FileHolds`) that can make
them wait (freeze, seal), and both are recorded in one journal
(`journal.ChangeJournal`).  `server.ControlServer` serves the control socket;
`client` and `cli` are the administrator's side.  docs/seeds.md tells why.
"""
