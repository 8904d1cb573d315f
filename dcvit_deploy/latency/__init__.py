"""Latency measurement: the one timing loop (:mod:`.loop`), interleaved rounds (:mod:`.rounds`),
fresh-process confirmation (:mod:`.confirm`) and the machine state (:mod:`.machine`)."""
