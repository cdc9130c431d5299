"""The mutation log: its format (:mod:`.entries`), the locations entries
write and reads read (:mod:`.locations`), the run-time dependence test
(:mod:`.conflicts`), replay (:mod:`.replay`) and the ordered commit
(:mod:`.commit`)."""
