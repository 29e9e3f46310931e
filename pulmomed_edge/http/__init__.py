"""The HTTP edge: routes, middlewares and the teacher's status page (parse → call → render)."""
