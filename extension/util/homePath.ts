// A leading ~ in a path the user typed into a setting is their home folder, as in a shell (VS Code does not expand
// it, and Node would create a folder named "~").
import * as os from 'node:os';

export function expandHome(value: string, home: string = os.homedir()): string {
  return value.replace(/^~(?=$|[\\/])/, () => home);
}
