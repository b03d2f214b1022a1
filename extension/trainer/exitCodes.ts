// Exit statuses of the command line besides 0 (done) and 1 (an error, said in one sentence on stderr), shared with
// the extension host, which reads these verbs' output.

/** inspect-data: the report is complete and lists invalid rows. */
export const INVALID_ROWS_EXIT_CODE = 2;
