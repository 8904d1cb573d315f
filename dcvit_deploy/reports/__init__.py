"""Reports: JSON / CSV / Markdown / plot writers (:mod:`.writers`) and the CI gate
(:mod:`.compare`)."""
