"""Selection: the budget, the decision and its structured reasons (:mod:`.decide`), and the
O(log N) search (:mod:`.bisect`)."""
