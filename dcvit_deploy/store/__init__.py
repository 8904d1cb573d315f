"""What goes to disk: typed records and their serialisation (:mod:`.records`), the locked run
directory (:mod:`.rundir`) and atomic writes (:mod:`.atomic`)."""
