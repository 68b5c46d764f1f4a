"""Running targets in processes: the prestarted child (:mod:`.prestart`), the supervisor that
collects what it streams (:mod:`.supervisor`), the target's own Python children (:mod:`.workers`),
and the glue of the ``check`` and ``stress``/``replay``/``merge`` commands (:mod:`.check`,
:mod:`.stress`). Kept free of torch and click: the console script imports it first."""
