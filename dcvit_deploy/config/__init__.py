"""What a run is asked to do: option records (:mod:`.options`), target profiles
(:mod:`.profiles`) and the checks that run before any work (:mod:`.validate`)."""
